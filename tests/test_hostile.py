"""A catalogue of broken and hostile checkpoints, fed to every command that reads checkpoints.

Each case must end the same way: exit status 1, exactly one line on stderr
that names the file or tensor, no traceback, and nothing left in the output's
parent folder (no output, no temporary folder, no lock file).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shadowgraft.cli import main
from shadowgraft.synthetic import Shape, make_trio
from shadowgraft.verify import verify

from .conftest import load

COMMANDS = ["apply", "verify"] + (["stats"] if importlib.util.find_spec("shadowgraft.commands.stats") else [])
NAN_TENSOR = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("good"), shape=Shape(layers=2, hidden=32, intermediate=48, vocab=64),
                     shard_bytes=16_000)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """The real CLI entry point, in process: exit status, stdout, stderr."""
    before = signal.getsignal(signal.SIGTERM)
    # A command that opened a FIFO would block for ever: fail instead.
    alarm = signal.signal(signal.SIGALRM, lambda *a: pytest.fail(f"blocked: {argv}"))
    signal.alarm(120)
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        signal.signal(signal.SIGTERM, before)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# -- surgery on safetensors files -----------------------------------------------------


def split(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite(f: Path, head: dict | bytes, data: bytes, length: int | None = None) -> None:
    body = head if isinstance(head, bytes) else json.dumps(head).encode()
    f.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def first_tensor(f: Path) -> str:
    head, _ = split(f)
    return min((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])


def edit_index(folder: Path, fn) -> None:
    p = folder / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


class Evil:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- the catalogue: each builder breaks a copy of a good model and says what the error must name --


def truncated(d):
    f = shards(d)[1]
    f.write_bytes(f.read_bytes()[:-100])
    return f.name


def lying_header_length(d):
    f = shards(d)[0]
    head, data = split(f)
    rewrite(f, head, data, length=10 << 20)  # under the cap, far past the end
    return f"{f.name}: header length"


def header_length_over_cap(d):
    f = shards(d)[0]
    head, data = split(f)
    rewrite(f, head, data, length=1 << 40)
    return "exceeds the"


def non_json_header(d):
    f = shards(d)[0]
    head, data = split(f)
    body = json.dumps(head).encode()
    rewrite(f, b"{" + b"\x07garbage" * (len(body) // 8), data)
    return f"{f.name}: header is not valid JSON"


def header_not_an_object(d):
    f = shards(d)[0]
    rewrite(f, b'["model.embed_tokens.weight"]', split(f)[1])
    return "not a JSON object"


def deeply_nested_header(d):
    f = shards(d)[0]
    rewrite(f, b"[" * 50_000, split(f)[1])
    return f"{f.name}: header is not valid JSON"


def offsets_past_end(d):
    f = shards(d)[0]
    head, data = split(f)
    name = first_tensor(f)
    start = head[name]["data_offsets"][0]
    head[name]["data_offsets"] = [start, len(data) + 64]
    rewrite(f, head, data)
    return name


def overlapping_offsets(d):
    f = shards(d)[0]
    head, data = split(f)
    names = sorted((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])
    a, b = names[0], names[1]
    nb = head[b]["data_offsets"][1] - head[b]["data_offsets"][0]
    head[b]["data_offsets"] = [0, nb]
    rewrite(f, head, data)
    return "overlap in the data area"


def _set_first(d, key: str, value) -> str:
    """Set ``key`` of the first tensor's header entry in the first shard; returns that tensor's name."""
    f = shards(d)[0]
    head, data = split(f)
    name = first_tensor(f)
    head[name][key] = value
    rewrite(f, head, data)
    return name


def unknown_dtype(d):
    return f"tensor '{_set_first(d, 'dtype', 'F33')}' has unknown dtype 'F33'"


def size_mismatch(d):
    return f"tensor '{_set_first(d, 'shape', [1])}' is"


def metadata_not_strings(d):
    f = shards(d)[0]
    head, data = split(f)
    head["__metadata__"] = {"format": 1}
    rewrite(f, head, data)
    return f"{f.name}: __metadata__ must map strings to strings"


def name_twice_in_header(d):
    f = shards(d)[0]
    head, data = split(f)
    name = first_tensor(f)
    body = json.dumps(head).encode()
    rewrite(f, body[:-1] + b"," + json.dumps({name: head[name]}).encode()[1:], data)
    return f"header names '{name}' twice"


def index_missing_shard(d):
    f = shards(d)[1]
    f.unlink()
    return f"shard '{f.name}' is missing"


def index_missing_tensor(d):
    edit_index(d, lambda w: w.update({"model.layers.9.ghost.weight": shards(d)[0].name}))
    return "'model.layers.9.ghost.weight'"


def index_path_traversal(d):
    outside = d.parent / f"{d.name}-elsewhere"
    outside.mkdir()
    shutil.copy(shards(d)[0], outside / shards(d)[0].name)
    name = first_tensor(shards(d)[0])
    edit_index(d, lambda w: w.update({name: f"../{outside.name}/{shards(d)[0].name}"}))
    return "leaves the checkpoint folder"


def index_name_twice(d):
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    name, shard = next(iter(idx["weight_map"].items()))
    other = next(v for v in idx["weight_map"].values() if v != shard)
    text = json.dumps(idx)
    # The same tensor listed again, in another shard: JSON readers disagree on which entry wins.
    p.write_text(text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{other}", ', 1))
    return f"names '{name}' twice; re-download the index"


def index_absolute_path(d):
    name = first_tensor(shards(d)[0])
    edit_index(d, lambda w: w.update({name: "/etc/passwd"}))
    return "shard name '/etc/passwd' leaves the checkpoint folder"


def symlink_escape(d):
    f = shards(d)[0]
    outside = d.parent / f"{d.name}-outside"
    outside.mkdir()
    shutil.move(f, outside / f.name)
    f.symlink_to(outside / f.name)
    return f"shard '{f.name}' is a link pointing outside the checkpoint folder"


def fifo_shard(d):
    f = shards(d)[0]
    f.unlink()
    os.mkfifo(f)
    return f"shard '{f.name}' is a FIFO (named pipe), not a regular file; refusing it"


def single_file_links_out(d):
    outside = d.parent / f"{d.name}-single"
    outside.mkdir()
    save_file({"w": torch.zeros(2)}, str(outside / "model.safetensors"))
    (d / "model.safetensors").symlink_to(outside / "model.safetensors")
    return "model.safetensors: is a link pointing outside the checkpoint folder"


def stale_index(d):
    name = first_tensor(shards(d)[1])
    edit_index(d, lambda w: w.pop(name))
    return f"tensor '{name}'"


def index_not_json(d):
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    return "model.safetensors.index.json: not valid JSON"


def duplicate_across_shards(d):
    a, b = shards(d)[0], shards(d)[1]
    name = first_tensor(a)
    ha, da = split(a)
    hb, db = split(b)
    lo, hi = ha[name]["data_offsets"]
    hb[name] = dict(ha[name], data_offsets=[len(db), len(db) + hi - lo])
    rewrite(b, hb, db + da[lo:hi])
    return f"'{name}'"


def shards_without_index(d):
    (d / "model.safetensors.index.json").unlink()
    return "but no index"


def pickle_only_folder(d):
    for f in shards(d):
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(d.parent / "UNPICKLED")))
    return "safetensors"


def pickle_file(d):
    pickle_only_folder(d)
    return "safetensors", d / "pytorch_model.bin"


def empty_folder(d):
    shutil.rmtree(d)
    d.mkdir()
    return "no .safetensors weights"


def wrong_path(d):
    shutil.rmtree(d)
    return "no such file or folder"


def not_a_safetensors_file(d):
    (d / "model.gguf").write_bytes(b"GGUF")
    return "not a .safetensors file", d / "model.gguf"


def hostile_tensor_name(d):
    f = shards(d)[0]
    head, data = split(f)
    name = first_tensor(f)
    evil = "\x1b[2J[bold]x[/bold]\n:smile:"
    head[evil] = dict(head.pop(name), dtype="F33")
    rewrite(f, head, data)
    # Every control character is shown escaped, the newline too: it cannot start a second line.
    return r"\x1b[2J[bold]x[/bold]\n:smile:"


CASES = [truncated, lying_header_length, header_length_over_cap, non_json_header, header_not_an_object,
         deeply_nested_header, offsets_past_end, overlapping_offsets, unknown_dtype, size_mismatch,
         metadata_not_strings, name_twice_in_header, index_missing_shard, index_missing_tensor,
         index_path_traversal, index_name_twice, index_absolute_path, symlink_escape, fifo_shard, single_file_links_out,
         stale_index, index_not_json, duplicate_across_shards, shards_without_index, pickle_only_folder,
         pickle_file, empty_folder, wrong_path, not_a_safetensors_file, hostile_tensor_name]


def build(case, good, root: Path) -> tuple[Path, str]:
    d = root / "broken"
    shutil.copytree(good["instruct"], d)
    got = case(d)
    return (d, got) if isinstance(got, str) else (got[1], got[0])


def argv_for(cmd: str, broken: Path, good, out: Path) -> list[str]:
    if cmd == "apply":
        return ["apply", "--instruct", str(broken), "--base", str(good["base"]), "--tuned", str(good["tuned"]),
                "--output", str(out), "--quiet"]
    if cmd == "stats":
        return ["stats", str(broken), str(good["base"]), "--quiet"]
    return ["verify", str(broken)]


def assert_one_line_failure(code: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err and "\x1b" not in err


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_catalogue(case, cmd, good, tmp_path, capsys):
    broken, needle = build(case, good, tmp_path)
    outs = tmp_path / "outs"
    outs.mkdir()
    code, _, err = run(argv_for(cmd, broken, good, outs / "out"), capsys)
    assert_one_line_failure(code, err, needle)
    assert list(outs.iterdir()) == []
    assert not (tmp_path / "UNPICKLED").exists()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 15


# -- pickles are refused unopened -------------------------------------------------------


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("case", [pickle_only_folder, pickle_file], ids=lambda c: c.__name__)
def test_pickles_are_never_unpickled(case, cmd, good, tmp_path, capsys, monkeypatch):
    calls = []

    def refuse(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return f

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    broken, _ = build(case, good, tmp_path)
    code, _, err = run(argv_for(cmd, broken, good, tmp_path / "out"), capsys)
    assert calls == []
    assert not (tmp_path / "UNPICKLED").exists()
    assert_one_line_failure(code, err, "pickle checkpoints are never loaded (they can run code); convert it to safetensors")


# -- NaN / Inf --------------------------------------------------------------------------


def poison(folder: Path, name: str, values: dict[int, float]) -> None:
    """Set some elements of ``name`` to NaN / Inf in place, keeping every byte offset."""
    for f in shards(folder) or [folder / "model.safetensors"]:
        head, data = split(f)
        if name in head:
            lo, hi = head[name]["data_offsets"]
            t = torch.frombuffer(bytearray(data[lo:hi]), dtype=torch.bfloat16).clone()
            for i, v in values.items():
                t[i] = v
            raw = f.read_bytes()
            start = len(raw) - len(data)  # the header bytes stay exactly as they were
            f.write_bytes(raw[: start + lo] + t.view(torch.uint8).numpy().tobytes() + raw[start + hi :])
            return
    raise KeyError(name)


def copy_of(good, role: str, root: Path) -> Path:
    d = root / f"{role}-poisoned"
    shutil.copytree(good[role], d)
    return d


BAD_VALUES = {0: math.nan, 5: math.inf, 17: -math.inf, 40: math.nan}


@pytest.mark.parametrize("cmd", COMMANDS)
def test_nan_in_a_grafted_tensor(cmd, good, tmp_path, capsys):
    tuned = copy_of(good, "tuned", tmp_path)
    poison(tuned, NAN_TENSOR, BAD_VALUES)
    outs = tmp_path / "outs"
    outs.mkdir()
    if cmd == "apply":
        argv = ["apply", "--instruct", str(good["instruct"]), "--base", str(good["base"]), "--tuned", str(tuned),
                "--output", str(outs / "out"), "--quiet", "--strict"]
        needle = f"'{NAN_TENSOR}': 4 NaN/Inf value(s) after grafting"
    elif cmd == "verify":
        argv, needle = ["verify", str(tuned)], f"tensor '{NAN_TENSOR}' has 4 NaN/Inf value(s) of 1536"
    else:
        from shadowgraft.commands.stats import command

        if "strict" not in {p.name for p in command.params}:
            pytest.skip("stats has no --strict: it reports NaN/Inf per tensor instead of failing")
        argv, needle = ["stats", str(good["base"]), str(tuned), "--strict", "--quiet"], NAN_TENSOR
    code, _, err = run(argv, capsys)
    assert_one_line_failure(code, err, needle)
    assert list(outs.iterdir()) == []


def test_nan_in_a_grafted_tensor_without_strict_warns_and_writes(good, tmp_path, capsys):
    tuned = copy_of(good, "tuned", tmp_path)
    poison(tuned, NAN_TENSOR, BAD_VALUES)
    out = tmp_path / "out"
    code, _, err = run(["apply", "--instruct", str(good["instruct"]), "--base", str(good["base"]),
                        "--tuned", str(tuned), "--output", str(out)], capsys)
    assert code == 0
    assert f"warning: NaN/Inf values in 1 grafted tensor(s): {NAN_TENSOR} (4)" in " ".join(err.split())
    report = verify(out)
    assert report.nonfinite == {NAN_TENSOR: 4}
    assert json.loads((out / "shadowgraft.json").read_text())["nonfinite"] == {NAN_TENSOR: 4}
    # Positions survive: NaN + finite = NaN, inf + finite = inf.
    y = load(out)[NAN_TENSOR].float().flatten()
    assert y[0].isnan() and y[5] == math.inf and y[17] == -math.inf and y[40].isnan()
    assert int((~torch.isfinite(y)).sum()) == 4


def test_nan_in_a_copied_tensor_is_not_read_by_apply_but_verify_reports_it(good, tmp_path, capsys):
    inst = copy_of(good, "instruct", tmp_path)
    poison(inst, "model.norm.weight", {3: math.nan})
    out = tmp_path / "out"
    code, _, err = run(["apply", "--instruct", str(inst), "--base", str(good["base"]), "--tuned", str(good["tuned"]),
                        "--output", str(out), "--quiet", "--strict"], capsys)
    assert code == 0, err  # copied byte for byte, never looked at
    code, _, err = run(["verify", str(out)], capsys)
    assert_one_line_failure(code, err, "tensor 'model.norm.weight' has 1 NaN/Inf value(s) of 32")
    code, out_text, err = run(["verify", "--quick", str(out)], capsys)
    assert code == 0 and "values not read (--quick)" in out_text


def test_markup_and_escapes_in_a_valid_name_print_literally(good, tmp_path, capsys):
    tuned = copy_of(good, "tuned", tmp_path)
    f = shards(tuned)[0]
    head, data = split(f)
    evil = "[/]x\x1b[2J:smile:"
    head[evil] = {"dtype": "U8", "shape": [4], "data_offsets": [len(data), len(data) + 4]}
    rewrite(f, head, data + b"abcd")
    edit_index(tuned, lambda w: w.update({evil: f.name}))
    code, _, err = run(["apply", "--instruct", str(good["instruct"]), "--base", str(good["base"]),
                        "--tuned", str(tuned), "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert r"1 tensor(s) only in tuned are ignored: [/]x\x1b[2J:smile:" in " ".join(err.split())
    assert "\x1b" not in err


# -- every other failure mode is one line too -------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["apply"], "error: Missing option '--instruct'; see 'shadowgraft apply --help'"),
    (["verify"], "error: Missing argument 'FOLDER'; see 'shadowgraft verify --help'"),
    (["nosuchcommand"], "error: No such command 'nosuchcommand'; see 'shadowgraft --help'"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and err.strip() == needle


def test_an_unexpected_exception_is_one_line_and_debug_shows_it(tmp_path, capsys, monkeypatch):
    import shadowgraft.verify as v

    def boom(*a, **k):
        raise ValueError("unexpected\nstate")

    monkeypatch.setattr(v, "verify", boom)
    code, _, err = run(["verify", str(tmp_path)], capsys)
    assert code == 1
    assert err.strip() == "error: unexpected state (ValueError; this is a bug: rerun with --debug and report it)"
    with pytest.raises(ValueError, match="unexpected"):
        run(["--debug", "verify", str(tmp_path)], capsys)
