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
