"""The writer path: shard headers, copies and casts, read back by safetensors itself."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from shadowgraft import Checkpoint
from shadowgraft.engine import Engine
from shadowgraft.plan import items_with
from shadowgraft.shards import plan_shards
from shadowgraft.errors import ShadowgraftError
from shadowgraft.synthetic import Shape, make_trio
from shadowgraft.writer import OutputDir, check_output_path, copy_side_files, index_json, side_files

from .conftest import deny, load, run_cli

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64]

tensor_st = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 5), min_size=0, max_size=3),
)
name_st = st.text("abcdefghij._0123456789", min_size=1, max_size=12)


def _write(src, out, max_shard):
    ck = Checkpoint.open(src)
    shards = plan_shards(ck, items_with(ck, None, {}), max_shard)
    eng = Engine([ck])
    with OutputDir(out) as tmp:
        for s in shards:
            eng.write_shard(s, tmp / s.file)
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json(shards)))
    ck.close()
    return shards


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.dictionaries(name_st, tensor_st, min_size=1, max_size=8), max_shard=st.sampled_from([None, 1, 40, 10_000]),
       seed=st.integers(0, 2**16))
def test_round_trip(tmp_path_factory, spec, max_shard, seed):
    root = tmp_path_factory.mktemp("rt")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (dtype, shape) in spec.items():
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 100
        tensors[name] = (x > 0) if dtype == torch.bool else x.to(dtype)
    save_file(tensors, str(root / "in.safetensors"))
    shards = _write(root / "in.safetensors", root / "out", max_shard)
    got = load(root / "out")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    if len(shards) > 1:
        idx = json.loads((root / "out" / "model.safetensors.index.json").read_text())
        assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
        assert {k: (root / "out" / f).is_file() for k, f in idx["weight_map"].items()} == {k: True for k in tensors}


def test_header_has_format_metadata_and_alignment(tmp_path):
    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(5, dtype=torch.float64), "c": torch.ones(1, dtype=torch.int8)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    _write(tmp_path / "in.safetensors", tmp_path / "out", None)
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0
    assert head["__metadata__"] == {"format": "pt"}
    for k, v in head.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % tensors[k].element_size() == 0


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    try:
        with OutputDir(out) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


# -- where an output may go ---------------------------------------------------------------


def _tree(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what must survive a refused run unchanged."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def home_and_cwd(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home, work


@pytest.mark.parametrize("output, why", [
    ("", "the output path is empty (an unset variable?); name a new folder with --output"),
    (".", ".: is the current folder, which an output would replace; choose a new folder with --output"),
    ("..", "..: is your home folder, which an output would replace; choose a new folder with --output"),
    ("/", "/: is the root folder /; choose a new folder with --output"),
    ("~", "~: is your home folder, which an output would replace; choose a new folder with --output"),
])
def test_output_never_replaces_cwd_home_root_or_an_empty_path(home_and_cwd, output, why):
    with pytest.raises(ShadowgraftError) as e:
        check_output_path(output)
    assert str(e.value) == why


def test_output_holding_the_current_folder_is_refused(home_and_cwd):
    home, work = home_and_cwd
    with pytest.raises(ShadowgraftError, match=r"holds the current folder, which an output would replace"):
        check_output_path(str(home.parent))  # holds home and the current folder: the first one found is named
    assert check_output_path(work / "new") == work / "new"


def test_output_never_enters_an_input(tmp_path):
    ins = tmp_path / "models" / "instruct"
    ins.mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link").symlink_to(ins)
    refused = {
        str(ins): "is the input",
        str(tmp_path / "models"): "holds the input",
        str(tmp_path / "link"): "is the input",  # links are resolved before comparing
        str(ins / "grafted"): "lies inside the input folder",
        str(data): "is the input",
    }
    for output, why in refused.items():
        with pytest.raises(ShadowgraftError, match=why):
            check_output_path(output, inputs=[ins, "org/hub-id", None, data])
    # A file input is not a folder: a sibling output is fine; an index names its folder.
    assert check_output_path(tmp_path / "out", inputs=[ins, data]) == tmp_path / "out"
    (ins / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ShadowgraftError, match="lies inside the input folder"):
        check_output_path(ins / "out", inputs=[ins / "model.safetensors.index.json"])


def test_overwrite_replaces_only_an_empty_folder_or_an_earlier_output(tmp_path):
    def write(out, **kw):
        with OutputDir(out, **kw) as tmp:
            (tmp / "model.safetensors").write_text("new")

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("thesis.tex", "a", "b", "c", "d"):
        (mine / name).write_text("keep")
    before = _tree(mine)
    with pytest.raises(ShadowgraftError) as e:
        write(mine, overwrite=True)
    assert str(e.value) == (f"{mine}: holds a, b, c, d and 1 more but no shadowgraft.json, so it is not an earlier "
                            "shadowgraft output and --overwrite will not replace it; choose another --output, or "
                            "empty or remove it yourself")
    assert _tree(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, overwrite=True)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "shadowgraft.json").write_text("{}")
    (earlier / "old.safetensors").write_text("old")
    write(earlier, overwrite=True)
    assert _tree(empty) == _tree(earlier) == {"model.safetensors": b"new"}
    # Another kind of output names its own mark (training checkpoints hold state.json).
    step = tmp_path / "step"
    step.mkdir()
    (step / "state.json").write_text("{}")
    write(step, overwrite=True, marker="state.json")
    assert _tree(step) == {"model.safetensors": b"new"}


def test_overwrite_rechecks_the_folder_at_commit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shadowgraft.json").write_text("{}")
    with pytest.raises(ShadowgraftError, match="not an earlier shadowgraft output"):
        with OutputDir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("new")
            (out / "shadowgraft.json").unlink()  # someone else's files took its place meanwhile
            (out / "notes.txt").write_text("keep")
    assert _tree(out) == {"notes.txt": b"keep"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_we_cannot_write_is_one_line_naming_no_lock_or_temp_file(tmp_path, monkeypatch):
    deny(monkeypatch, os, "open", "shadowgraft-lock")
    with pytest.raises(ShadowgraftError) as e:
        with OutputDir(tmp_path / "out"):
            pass
    assert str(e.value) == (f"{tmp_path / 'out'}: cannot create the output there (Permission denied); "
                            f"check the permissions of {tmp_path} or choose another --output")


@pytest.mark.parametrize("where", ["", ".", "instruct", "tuned", "holder"])
def test_apply_overwrite_never_deletes_its_inputs(tmp_path, monkeypatch, capsys, where):
    """The issue's cases: -o "" (an unset $OUT), -o ., -o INSTRUCT, -o TUNED, -o the folder holding all inputs."""
    holder = tmp_path / "holder"
    trio = make_trio(holder, shape=Shape(layers=1, hidden=16, intermediate=24, vocab=32))
    (holder / "shadowgraft.json").write_text("{}")  # even looking like an earlier output does not make it replaceable
    monkeypatch.chdir(holder)
    before = _tree(tmp_path)
    output = {"": "", ".": ".", "instruct": str(trio["instruct"]), "tuned": str(trio["tuned"]), "holder": str(holder)}[where]
    code, _, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--base", trio["base"], "--tuned", trio["tuned"],
                           "-o", output, "--overwrite", "-q")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert "new folder with --output" in err
    assert _tree(tmp_path) == before


# -- side files ---------------------------------------------------------------------------


def test_side_files_are_regular_files_of_the_folder_and_nothing_hidden(tmp_path):
    src = tmp_path / "instruct"
    (src / "original").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / ".env").write_text("HF_TOKEN=hf_secret")
    (src / "tokenizer.json").symlink_to("config.json")
    (src / "model.safetensors").write_text("weights are not side files")
    dst = tmp_path / "out"
    dst.mkdir()
    assert copy_side_files(side_files(src), dst) == ["config.json", "tokenizer.json"]
    assert _tree(dst) == {"config.json": b"{}", "tokenizer.json": b"{}"}


def test_a_side_file_linking_to_the_environment_refuses_the_apply_before_writing(tmp_path, monkeypatch, capsys):
    """The issue's case: added_tokens.json -> /proc/self/environ put an HF_TOKEN into the output."""
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak_me")
    trio = make_trio(tmp_path / "in", shape=Shape(layers=1, hidden=16, intermediate=24, vocab=32))
    (trio["instruct"] / "added_tokens.json").symlink_to("/proc/self/environ")
    outs = tmp_path / "outs"
    outs.mkdir()
    code, _, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--base", trio["base"], "--tuned", trio["tuned"],
                           "-o", outs / "g", "-q")
    assert code == 1 and err.count("\n") == 1
    assert f"{trio['instruct'] / 'added_tokens.json'}: is a link pointing outside the checkpoint folder" in err
    assert list(outs.iterdir()) == []


def test_a_fifo_side_file_is_refused_without_blocking(tmp_path):
    import signal

    src = tmp_path / "instruct"
    src.mkdir()
    os.mkfifo(src / "tokenizer_config.json")
    before = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked opening the FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(ShadowgraftError, match=r"tokenizer_config.json: is a FIFO \(named pipe\), not a regular file"):
            side_files(src)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
