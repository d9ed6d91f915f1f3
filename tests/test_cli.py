"""The `apply` command's exit codes and one-line errors."""

from __future__ import annotations

import pytest

from shadowgraft.synthetic import Shape, make_trio

from .conftest import load, run_cli


def _apply(trio, out, *extra):
    return ["apply", "--instruct", trio["instruct"], "--base", trio["base"], "--tuned", trio["tuned"], "--output", out, *extra]


def test_apply_ok_prints_summary(tmp_path, trio, capsys):
    code, out, err = run_cli(capsys, *_apply(trio, tmp_path / "o"))
    assert code == 0, err
    assert "grafted" in out and "21" in out
    assert set(load(tmp_path / "o")) == set(load(trio["instruct"]))


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, trio, capsys):
    code, out, err = run_cli(capsys, *_apply(trio, tmp_path / "o", "--dry-run"))
    assert code == 0
    assert "model.layers.0.mlp.up_proj.weight" in out and "graft" in out
    assert "21 graft, 9 copy, 0 cast" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["apply"], ["apply", "--instruct", "x", "--output", "o", "--scope", "bogus"], ["nosuchcommand"]])
def test_usage_errors_exit_2(capsys, args):
    code, _, _ = run_cli(capsys, *args)
    assert code == 2


def test_existing_output_exit_1_one_line(tmp_path, trio, capsys):
    (tmp_path / "o").mkdir()
    code, out, err = run_cli(capsys, *_apply(trio, tmp_path / "o"))
    assert code == 1
    assert err.strip().count("\n") == 0 and "already exists; pass --overwrite" in err
    assert "Traceback" not in err


def test_mode_conflict_is_an_error(tmp_path, trio, capsys):
    code, _, err = run_cli(capsys, *_apply(trio, tmp_path / "o", "--delta", trio["base"]))
    assert code == 1 and "give exactly one of" in err


def test_truncated_shard_exit_1_nothing_left(tmp_path, capsys):
    trio = make_trio(tmp_path / "in", shape=Shape(layers=2), shard_bytes=50_000)
    shard = sorted(trio["tuned"].glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    code, _, err = run_cli(capsys, *_apply(trio, tmp_path / "o"))
    assert code == 1 and shard.name in err and "re-download" in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_pickle_only_instruct_refused(tmp_path, trio, capsys):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"junk")
    code, _, err = run_cli(capsys, "apply", "--instruct", bad, "--base", trio["base"], "--tuned", trio["tuned"], "--output", tmp_path / "o")
    assert code == 1 and "safetensors" in err and "pytorch_model.bin" in err
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path, trio, capsys):
    (tmp_path / "o").mkdir()
    with pytest.raises(Exception, match="already exists"):
        from shadowgraft.cli import main

        main(["--debug", *map(str, _apply(trio, tmp_path / "o"))])


def test_demo_runs(tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--workdir", tmp_path / "d")
    assert code == 0, err
    assert "tensors grafted" in out and (tmp_path / "d" / "grafted" / "shadowgraft.json").exists()


def test_dry_run_shows_each_tensors_alpha(tmp_path, trio, capsys):
    import re

    code, out, err = run_cli(capsys, *_apply(trio, tmp_path / "o", "--dry-run", "--alpha", "0.5", "--alpha-for", "mlp=0.25",
                                             "--include", r"layers\.0\.mlp\.up"))
    assert code == 0, err
    rows = [line for line in out.splitlines() if "graft" in line and "layers" in line]
    assert len(rows) == 1 and re.search(r"graft\s+│\s+0\.25\s+│", rows[0])
    assert "plan (alpha 0.5)" in out


# -- option values are usage errors, checked before anything is read ---------------------------------------------

MISSING = "/nonexistent/instruct"  # never opened: each check must fire first


@pytest.mark.parametrize("args, flag, why", [
    (["--alpha", "nan"], "--alpha", "--alpha must be finite numbers, got nan"),
    (["--alpha", "0.5,1e400"], "--alpha", "--alpha must be finite numbers, got 0.5,1e400"),
    (["--alpha", "0.5,1e-400"], "--alpha", "--alpha '1e-400' is too small to be told from 0 in floating point"),
    (["--alpha-for", "mlp(=0.5"], "--alpha-for", "--alpha-for 'mlp(' is not a valid regular expression"),
    (["--alpha-for", "mlp=nan"], "--alpha-for", "--alpha-for 'mlp' must be finite numbers, got nan"),
    (["--dtype", "x"], "--dtype", "unknown dtype 'x'"),
    (["--device", "x"], "--device", "unknown device 'x'"),
    (["--max-shard-size", "x"], "--max-shard-size", "size 'x' not understood"),
    (["--max-shard-size", "0"], "--max-shard-size", "size '0' must be positive"),
    (["--include", "("], "--include", "pattern '(' is not a valid regular expression"),
    (["--exclude", "[a"], "--exclude", "pattern '[a' is not a valid regular expression"),
    (["--push-to-hub", "me/bad name"], "--push-to-hub", "me/bad name: not a valid Hub repo id"),
])
def test_bad_apply_option_values_exit_2(tmp_path, capsys, args, flag, why):
    code, out, err = run_cli(capsys, "apply", "--instruct", MISSING, "--base", MISSING, "--tuned", MISSING,
                             "-o", tmp_path / "o", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: Invalid value for '{flag}': {why}"), err
    assert lines[0].endswith("see 'shadowgraft apply --help'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, flag", [(["--threshold", "x"], "--threshold"), (["--threshold", "nan"], "--threshold"),
                                        (["--threshold", "0"], "--threshold"), (["--close", "inf"], "--close"),
                                        (["--include", "("], "--include")])
def test_bad_stats_option_values_exit_2(capsys, args, flag):
    code, _, err = run_cli(capsys, "stats", MISSING, MISSING, *args)
    assert code == 2 and err.startswith(f"error: Invalid value for '{flag}'"), err


@pytest.mark.parametrize("args, flag", [(["--dtype", "int8"], "--dtype"), (["--device", "tpu"], "--device"),
                                        (["--max-shard-size", "-1GB"], "--max-shard-size")])
def test_bad_diff_option_values_exit_2(tmp_path, capsys, args, flag):
    code, _, err = run_cli(capsys, "diff", MISSING, MISSING, "-o", tmp_path / "o", *args)
    assert code == 2 and err.startswith(f"error: Invalid value for '{flag}'"), err


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_bad_report_paths_are_refused_before_reading(tmp_path, capsys, flag):
    name = "r.png" if flag == "--plot" else "r.out"
    code, _, err = run_cli(capsys, "stats", MISSING, MISSING, flag, tmp_path / "no" / "such" / name)
    assert code == 2 and f"Invalid value for '{flag}': folder {tmp_path / 'no' / 'such'} does not exist" in err, err
    code, _, err = run_cli(capsys, "stats", MISSING, MISSING, flag, tmp_path)
    assert code == 2 and f"{tmp_path} is a folder; name a file" in err, err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os

    if os.access(locked, os.W_OK):  # root ignores permissions
        pytest.skip("running as root: permission bits are not enforced")
    code, _, err = run_cli(capsys, "stats", MISSING, MISSING, flag, locked / name)
    assert code == 2 and "cannot be written here (permission denied)" in err, err


def test_push_target_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "apply", "--instruct", MISSING, "--base", MISSING, "--tuned", MISSING,
                           "-o", tmp_path / "o", "--push-to-hub", "me/graft")
    assert code == 1 and err.strip() == "error: push to me/graft: HF_HUB_OFFLINE=1 is set; unset it to upload", err
    code, _, err = run_cli(capsys, "push", MISSING, "me/x--y")
    assert code == 2 and err.startswith("error: Invalid value for 'REPO_ID': me/x--y: not a valid Hub repo id"), err


def test_include_matching_nothing_exits_1_and_writes_nothing(tmp_path, trio, capsys):
    code, _, err = run_cli(capsys, *_apply(trio, tmp_path / "o", "--include", "q_prj"))
    assert code == 1 and err.startswith("error: --include 'q_prj' matches no floating tensor inside --scope linear"), err
    assert not (tmp_path / "o").exists()


def test_bare_command_prints_the_help(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2
    text = out + err
    assert text.startswith("Usage: shadowgraft [OPTIONS] COMMAND [ARGS]...") and "error:" not in text
    assert "\n  apply " in text and "\n  stats " in text


# -- the collector, paused for the imports of a one-command process --------------------------------------------

_PROBE = r"""
import gc, json, sys
from shadowgraft import cli, compare, graft
seen = {}
def probe(name, fn):
    def wrapped(*a, **k):
        seen[name] = [gc.isenabled(), gc.get_freeze_count() > 0]
        return fn(*a, **k)
    return wrapped
compare.stats = probe("stats", compare.stats)
graft.apply = probe("apply", graft.apply)
before = gc.isenabled()
sys.argv = ["shadowgraft", *sys.argv[1:]]
try:
    cli.console()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({"before": before, **seen}))
"""


@pytest.mark.parametrize("command", ["stats", "apply"])
def test_the_script_works_with_the_collector_on(tmp_path, trio, command):
    # The script pauses the collector only for the imports: the work itself runs with it on, past what they made.
    import json
    import subprocess
    import sys

    args = (["stats", trio["base"], trio["instruct"], "--quiet"] if command == "stats"
            else _apply(trio, tmp_path / "o", "--quiet"))
    done = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] is True and seen[command] == [True, True]


def test_pause_and_imported_and_an_in_process_main(trio, capsys, monkeypatch):
    import gc

    from shadowgraft import heap

    monkeypatch.setattr(heap, "_state", {"for_good": False, "held": 0, "paused": False})

    assert gc.isenabled() and gc.get_freeze_count() == 0
    # In-process, main leaves the collector alone (nothing frozen in the caller's process).
    code, _, err = run_cli(capsys, "stats", trio["base"], trio["instruct"], "--quiet")
    assert code == 0, err
    assert gc.isenabled() and gc.get_freeze_count() == 0
    heap.pause()
    try:
        assert not gc.isenabled()
        heap.imported()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        heap.imported()  # once only
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
