"""Opening checkpoints in every supported layout, and refusing what we must not read."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from shadowgraft import Checkpoint, ShadowgraftError
from shadowgraft.synthetic import Shape, make_trio

from .conftest import deny, load


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


def test_a_single_file_linking_out_of_its_folder_is_refused(tmp_path):
    elsewhere = make_trio(tmp_path / "elsewhere", shape=Shape(layers=1))["base"] / "model.safetensors"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(ShadowgraftError, match=r"model.safetensors: is a link pointing outside the checkpoint folder"):
        Checkpoint.open(folder)


def test_a_fifo_in_place_of_a_shard_is_refused_without_opening_it(tmp_path):
    import signal

    folder = make_trio(tmp_path, shape=Shape(layers=1), shard_bytes=20_000)["base"]
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    before = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked opening the FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(ShadowgraftError, match=rf"shard '{shard.name}' is a FIFO \(named pipe\), not a regular file"):
            Checkpoint.open(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_both_layouts_in_one_folder_read_what_transformers_loads(tmp_path):
    """model.safetensors beside an index: transformers loads the single file, and so does Checkpoint."""
    transformers = pytest.importorskip("transformers")
    trio = make_trio(tmp_path, shape=Shape(layers=1, hidden=32, intermediate=48, vocab=64), shard_bytes=8_000)
    folder = trio["instruct"]
    assert (folder / "model.safetensors.index.json").is_file()
    single = load(trio["base"])  # other values than instruct's shards, so the two readings differ
    save_file(single, str(folder / "model.safetensors"), metadata={"format": "pt"})
    name = "model.layers.0.mlp.up_proj.weight"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert torch.equal(model.state_dict()[name], single[name])
    with Checkpoint.open(folder) as ck:
        assert ck.files == [folder / "model.safetensors"]
        assert torch.equal(ck.view(name), single[name])
        assert ck.notes and "reading model.safetensors, as transformers does" in ck.notes[0]


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    from shadowgraft import hub

    (tmp_path / "ok").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "resolve", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(FileNotFoundError) as e:
        Checkpoint.open("ok/bsae")
    assert str(e.value) == "ok/bsae: no such file or folder in the local folder ok/ (so it is not read as a Hub repo id); check the spelling"


def test_an_unreadable_shard_is_one_line_without_errno_text(tmp_path, monkeypatch):
    import builtins

    folder = make_trio(tmp_path, shape=Shape(layers=1))["base"]
    deny(monkeypatch, builtins, "open", ".safetensors")
    with pytest.raises(ShadowgraftError) as e:
        Checkpoint.open(folder)
    assert str(e.value) == f"{folder / 'model.safetensors'}: cannot be read (Permission denied); check its permissions"
