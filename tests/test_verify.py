"""``shadowgraft verify`` and the cheap check ``apply`` runs before its rename."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shadowgraft
from shadowgraft import ShadowgraftError
from shadowgraft.stream import CHUNK
from shadowgraft.synthetic import Shape, make_trio
from shadowgraft.header import read_header
from shadowgraft.verify import record_outputs, verify

from .conftest import load
from .test_hostile import poison, rewrite, run, shards, split


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    root = tmp_path_factory.mktemp("v")
    trio = make_trio(root / "in", shape=Shape(layers=2, hidden=32, intermediate=48, vocab=64), shard_bytes=16_000)
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=root / "out")
    return root / "out"


@pytest.fixture
def out(grafted, tmp_path):
    d = tmp_path / "out"
    shutil.copytree(grafted, d)
    return d


def test_clean_output_passes_and_is_described(out, capsys):
    r = verify(out)
    tensors = load(out)
    assert r.ok and r.problems == () and r.warnings == () and r.values_checked and r.nonfinite == {}
    assert r.n_tensors == len(tensors)
    assert r.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert r.files == tuple(p.name for p in shards(out)) and len(r.files) > 1
    code, text, err = run(["verify", str(out)], capsys)
    assert code == 0 and err == ""
    assert text.strip() == f"ok: {out}: {r.n_tensors} tensors in {len(r.files)} file(s), {r.nbytes / 1e3:.2f} KB; every float value finite"


def test_apply_records_size_and_header_hash_of_each_file(out):
    outputs = json.loads((out / "shadowgraft.json").read_text())["outputs"]
    assert set(outputs) == {p.name for p in shards(out)} | {"model.safetensors.index.json"}
    for p in shards(out):
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert outputs[p.name] == {"size": len(raw), "header_sha256": hashlib.sha256(raw[: 8 + n]).hexdigest()}
    idx = (out / "model.safetensors.index.json").read_bytes()
    assert outputs["model.safetensors.index.json"] == {"size": len(idx), "sha256": hashlib.sha256(idx).hexdigest()}
    assert record_outputs([read_header(p) for p in shards(out)], out / "model.safetensors.index.json") == outputs


def test_resaved_shard_is_caught_by_its_header_hash(out):
    f = shards(out)[0]
    head, data = split(f)
    head["__metadata__"] = {"format": "xx"}
    body = json.dumps(head, separators=(",", ":")).encode()
    # Same file size, different header: only the hash can tell.
    old_n = int.from_bytes(f.read_bytes()[:8], "little")
    assert len(body) <= old_n
    rewrite(f, body + b" " * (old_n - len(body)), data)
    assert verify(out, full=False).problems == (
        f"{f}: header sha256 differs from the one recorded in shadowgraft.json; the file was re-saved or replaced",)


def test_trailing_bytes_give_one_problem_not_two(out):
    f = shards(out)[1]
    with open(f, "ab") as fh:
        fh.write(b"\0" * 24)
    # The size no longer matches shadowgraft.json either; that is the same cause, reported once.
    assert verify(out).problems == (f"{f}: 24 byte(s) after the last tensor; safetensors refuses such files, re-save it",)


def test_gap_between_tensors_is_reported(tmp_path):
    f = tmp_path / "m.safetensors"
    rewrite(f, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8))
    assert shadowgraft.Checkpoint.open(f)["a"].shape == (1,)  # readable by us...
    problem = f"{f}: bytes 0..4 of the data area belong to no tensor (before 'a'); safetensors refuses such files, re-save it"
    assert verify(f).problems == (problem,)  # ...but not by transformers


def test_a_name_only_python_json_accepts_is_caught_by_the_library(tmp_path):
    f = tmp_path / "m.safetensors"
    rewrite(f, b'{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0")
    (problem,) = verify(f).problems
    assert problem.startswith(f"{f}: the safetensors library refuses it (")


def test_changed_record_names(out):
    rec = json.loads((out / "shadowgraft.json").read_text())
    rec["grafted"].append("model.layers.7.ghost.weight")
    rec["copied"].remove("model.norm.weight")
    (out / "shadowgraft.json").write_text(json.dumps(rec))
    assert verify(out, full=False).problems == (
        f"{out / 'shadowgraft.json'}: grafted tensor 'model.layers.7.ghost.weight' is not in the checkpoint; "
        "the folder was changed after shadowgraft wrote it",
        f"{out}: tensor 'model.norm.weight' is not recorded in shadowgraft.json; the folder was changed after shadowgraft wrote it",
    )


def test_record_cannot_point_outside_the_folder(out):
    rec = json.loads((out / "shadowgraft.json").read_text())
    rec["outputs"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    (out / "shadowgraft.json").write_text(json.dumps(rec))
    assert verify(out, full=False).problems == (f"{out / 'shadowgraft.json'}: output entry '../../etc/passwd' is malformed",)


def test_index_rewritten_after_the_fact(out):
    p = out / "model.safetensors.index.json"
    text = p.read_text()
    p.write_text(text.replace("\n  ", "\n\t ", 1))  # same size, same meaning, other bytes
    assert p.stat().st_size == len(text)
    assert verify(out, full=False).problems == (
        f"{p}: sha256 differs from the one recorded in shadowgraft.json; the file changed after shadowgraft wrote it",)


def test_record_without_outputs_is_a_warning(out):
    rec = json.loads((out / "shadowgraft.json").read_text())
    del rec["outputs"]
    (out / "shadowgraft.json").write_text(json.dumps(rec))
    r = verify(out)
    assert r.ok and r.warnings == (
        f"{out / 'shadowgraft.json'}: no 'outputs' record (older shadowgraft); file sizes and header hashes not compared",)


def test_wrong_total_size_is_a_warning(out, capsys):
    p = out / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    have = idx["metadata"]["total_size"]
    idx["metadata"]["total_size"] = have + 2
    p.write_text(json.dumps(idx))
    rec = json.loads((out / "shadowgraft.json").read_text())
    del rec["outputs"]
    (out / "shadowgraft.json").write_text(json.dumps(rec))
    code, _, err = run(["verify", "--quick", str(out)], capsys)
    assert code == 0
    assert f"warning: {p}: metadata.total_size is {have + 2} but the tensors hold {have} bytes (loaders ignore it)" in err


def test_every_nonfinite_tensor_is_its_own_line(out, capsys):
    poison(out, "model.layers.1.self_attn.q_proj.weight", {1: math.nan, 2: math.nan})
    poison(out, "lm_head.weight", {0: math.inf})
    r = verify(out)
    assert r.nonfinite == {"model.layers.1.self_attn.q_proj.weight": 2, "lm_head.weight": 1}
    code, _, err = run(["verify", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert any("tensor 'lm_head.weight' has 1 NaN/Inf value(s) of 2048" in ln for ln in lines)
    assert any("tensor 'model.layers.1.self_attn.q_proj.weight' has 2 NaN/Inf value(s) of 1024" in ln for ln in lines)


def test_hash_against_a_hub_cache_blob(tmp_path, capsys):
    trio = make_trio(tmp_path / "in", shape=Shape(layers=1, hidden=16, intermediate=24, vocab=32))
    data = (trio["base"] / "model.safetensors").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    repo = tmp_path / "models--org--m"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(data)
    (snap / "model.safetensors").symlink_to(Path("../../blobs") / digest)
    code, text, _ = run(["verify", "--hash", "--quick", str(snap)], capsys)
    assert code == 0 and f"{digest}  model.safetensors" in text
    # A corrupt download: the blob no longer hashes to its own name.
    blob = repo / "blobs" / digest
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 1
    blob.write_bytes(bytes(raw))
    code, _, err = run(["verify", "--hash", "--quick", str(snap)], capsys)
    assert code == 1 and f"differs from its Hub blob name {digest}; the download is corrupt" in err


def test_apply_keeps_nothing_that_fails_the_check(tmp_path, monkeypatch):
    trio = make_trio(tmp_path / "in", shape=Shape(layers=1, hidden=16, intermediate=24, vocab=32))
    from shadowgraft import verify as v

    monkeypatch.setattr(v, "_library_problem", lambda h: f"{h.file}: refused for the test")
    with pytest.raises(ShadowgraftError, match="the written checkpoint fails verification, so it was not kept: .*refused for the test"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_missing_path(tmp_path, capsys):
    code, _, err = run(["verify", str(tmp_path / "nope")], capsys)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_count_matches_torch_isfinite(tmp_path, dtype):
    fi = torch.finfo(dtype)
    edge = torch.tensor([0.0, -0.0, 1.0, fi.max, -fi.max, fi.tiny, fi.tiny / 4, math.inf, -math.inf, math.nan], dtype=dtype)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[edge.element_size()]
    neg_nan = torch.tensor([math.nan], dtype=dtype).view(ints) | torch.tensor([-(2 ** (8 * edge.element_size() - 1))], dtype=ints)
    edge = torch.cat([edge, neg_nan.view(dtype)])
    torch.manual_seed(0)
    big = torch.randn(CHUNK + 10, dtype=torch.float64).to(dtype)  # crosses a chunk boundary
    big[0], big[CHUNK - 1], big[CHUNK + 3] = math.nan, math.inf, -math.inf
    clean = torch.randn(50, dtype=torch.float64).to(dtype)
    f = tmp_path / "m.safetensors"
    save_file({"edge": edge, "big": big, "clean": clean, "ints": torch.arange(9)}, str(f))
    want = {n: int((~torch.isfinite(t)).sum()) for n, t in (("edge", edge), ("big", big))}
    assert want == {"edge": 4, "big": 3}
    assert verify(f).nonfinite == want


def test_a_link_out_or_a_fifo_in_an_output_is_flagged_without_being_opened(out, capsys):
    (out / "added_tokens.json").symlink_to("/proc/self/environ")
    os.mkfifo(out / "special_tokens_map.json")
    import signal

    before = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked opening the FIFO"))
    signal.alarm(20)
    try:
        code, _, err = run(["verify", str(out)], capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert code == 1
    assert err.splitlines() == [
        f"error: {out / 'added_tokens.json'}: is a link pointing outside the checkpoint folder (to /proc/{os.getpid()}/environ); "
        "refusing it, put the file itself in the folder",
        f"error: {out / 'special_tokens_map.json'}: is a FIFO (named pipe), not a regular file; refusing it, put the real file in its place",
    ]


def test_a_new_output_has_each_header_read_once(tmp_path, monkeypatch):
    """The post-write check, the outputs record and the final check once read every header three times."""
    from shadowgraft import checkpoint, header
    from shadowgraft import verify as v

    trio = make_trio(tmp_path / "in", shape=Shape(layers=2, hidden=32, intermediate=48, vocab=64), shard_bytes=16_000)
    reads: list[str] = []
    real = header.read_header

    def counted(path):
        reads.append(Path(path).name) if ".shadowgraft-tmp-" in str(path) or "/out/" in str(path) else None
        return real(path)

    for mod in (header, checkpoint, v):
        monkeypatch.setattr(mod, "read_header", counted)
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    written = sorted(p.name for p in shards(tmp_path / "out"))
    assert len(written) > 1 and sorted(reads) == written


def test_both_layouts_in_one_folder_is_a_warning(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"b": "model-00001-of-00001.safetensors"}}')
    r = verify(tmp_path)
    assert r.files == ("model.safetensors",) and r.problems == ()
    assert r.warnings == (f"{tmp_path}: holds both model.safetensors and model.safetensors.index.json; reading "
                          "model.safetensors, as transformers does (remove one of them to make the folder unambiguous)",)


def test_a_shard_the_index_does_not_name_is_a_problem_as_for_push(tmp_path):
    save_file({"b": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"b": "model-00001-of-00001.safetensors"}}')
    save_file({"b": torch.zeros(2)}, str(tmp_path / "stray.safetensors"))
    assert verify(tmp_path).problems == (f"{tmp_path / 'stray.safetensors'} is not part of the checkpoint (the index does "
                                         "not name it); remove it or fix the index",)


def test_fp8_nan_bytes_are_counted(tmp_path):
    w = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    w.view(torch.uint8)[0, :3] = torch.tensor([0x7F, 0xFF, 0x7E], dtype=torch.uint8)  # NaN, -NaN, 448 (finite)
    save_file({"model.layers.0.mlp.up_proj.weight": w, "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)},
              str(tmp_path / "model.safetensors"))
    r = verify(tmp_path)
    assert r.nonfinite == {"model.layers.0.mlp.up_proj.weight": 2}
