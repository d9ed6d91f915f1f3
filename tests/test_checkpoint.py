"""Opening checkpoints in every supported layout, and refusing what we must not read."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from shadowgraft import Checkpoint, ShadowgraftError
from shadowgraft.synthetic import Shape, make_trio

from .conftest import load


def test_layouts_agree(tmp_path):
    sharded = make_trio(tmp_path / "s", shape=Shape(layers=2), shard_bytes=40_000)["base"]
    single = make_trio(tmp_path / "one", shape=Shape(layers=2))["base"]
    a = Checkpoint.open(sharded)
    b = Checkpoint.open(single)
    c = Checkpoint.open(single / "model.safetensors")
    d = Checkpoint.open(sharded / "model.safetensors.index.json")
    assert len(a.files) > 1 and len(b.files) == 1
    assert [t.name for t in a] == [t.name for t in d]
    assert set(a.tensors) == set(b.tensors) == set(c.tensors)
    ref = load(single)
    for name in a.tensors:
        assert torch.equal(a.view(name), ref[name])
        assert torch.equal(c.view(name), ref[name])
    assert c.root is None and b.root == single


def test_read_into_reads_any_range(tmp_path):
    x = torch.arange(1000, dtype=torch.float32)
    save_file({"x": x, "y": torch.zeros(3)}, str(tmp_path / "m.safetensors"))
    ck = Checkpoint.open(tmp_path / "m.safetensors")
    buf = torch.empty(100 * 4, dtype=torch.uint8)
    ck.read_into(ck["x"], 400 * 4, buf.numpy())
    assert torch.equal(buf.view(torch.float32), x[400:500])
    with pytest.raises(ShadowgraftError, match=r"has no tensor 'nope'"):
        ck["nope"]


def test_pickle_only_folder_refused_without_loading(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ShadowgraftError, match="pickle checkpoints are never loaded .* convert it to safetensors"):
        Checkpoint.open(tmp_path)
    with pytest.raises(ShadowgraftError, match="pickle checkpoints are never loaded"):
        Checkpoint.open(tmp_path / "pytorch_model.bin")


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        Checkpoint.open(str(tmp_path / "nope"))


def test_several_files_without_index_is_ambiguous(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ShadowgraftError, match="2 .safetensors files .* but no index"):
        Checkpoint.open(tmp_path)


def test_index_escaping_folder_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(ShadowgraftError, match="leaves the checkpoint folder"):
        Checkpoint.open(folder)
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "link.safetensors"}}))
    with pytest.raises(ShadowgraftError, match="link pointing outside the checkpoint folder"):
        Checkpoint.open(folder)


def test_truncated_shard_refused(tmp_path):
    folder = make_trio(tmp_path, shape=Shape(layers=1))["base"]
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ShadowgraftError, match=r"model\.safetensors: tensor '.*' data_offsets .* run past the end of the file"):
        Checkpoint.open(folder)


def test_sample_hash_tells_apart_checkpoints_with_one_architecture(tmp_path):
    trio = make_trio(tmp_path, shape=Shape(layers=1))
    base, tuned = Checkpoint.open(trio["base"]), Checkpoint.open(trio["tuned"])
    assert base.header_hashes() == tuned.header_hashes()
    assert base.sample_hash() != tuned.sample_hash()
    assert base.sample_hash() == Checkpoint.open(trio["base"]).sample_hash()
    d = base.describe()
    assert d["path"] == str(trio["base"].absolute()) and d["sample_sha256"] == base.sample_hash()


def test_a_missing_file_name_is_not_taken_for_a_hub_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("model.safetensors", "org/model.safetensors", "model.safetensors.index.json", "adapter.bin"):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            Checkpoint.open(name)
