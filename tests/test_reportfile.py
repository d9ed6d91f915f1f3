"""reportfile: stats' --json/--csv/--plot replace only an earlier report of their kind, and are written whole or not at all."""

from __future__ import annotations

import csv
import errno
import io
import json
import os

import pytest

from shadowgraft import ShadowgraftError, reportfile

from .conftest import run_cli


def stats_args(trio, *more):
    return ["stats", trio["base"], trio["instruct"], "-q", *more]


def test_reports_are_written_and_an_earlier_report_is_replaced(trio, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    js, cs = folder / "r.json", folder / "r.csv"
    for _ in range(2):  # the second run replaces the first run's files
        code, _, err = run_cli(capsys, *stats_args(trio, "--json", js, "--csv", cs))
        assert (code, err) == (0, "")
    d = json.loads(js.read_text())
    rows = list(csv.DictReader(io.StringIO(cs.read_text())))
    assert len(rows) == len(d["tensors"]) > 0
    assert js.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in folder.iterdir()) == ["r.csv", "r.json"]  # no temporary file left


def test_an_input_checkpoint_file_is_refused_before_any_work(trio, capsys):
    index = trio["base"] / "model.safetensors.index.json"
    shard = next(trio["base"].glob("*.safetensors"))
    for option, target in (("--json", index), ("--csv", shard)):
        before = target.read_bytes()
        code, out, err = run_cli(capsys, *stats_args(trio, option, target))
        assert code == 1 and out == ""
        assert err.strip() == (f"error: {target} exists and is not an earlier {option} report, so it is left alone; "
                               "name a new file, or remove that one first")
        assert target.read_bytes() == before


@pytest.mark.parametrize("option,name,text", [("--json", "notes.json", '{"mine": 1}\n'), ("--csv", "data.csv", "a,b\n1,2\n"),
                                              ("--json", "other.json", "not json"), ("--plot", "photo.png", "\x89PNG")])
def test_a_file_of_the_users_is_left_alone(trio, tmp_path, capsys, option, name, text):
    p = tmp_path / name
    p.write_text(text)
    code, _, err = run_cli(capsys, *stats_args(trio, option, p))
    assert code == 1 and "is not an earlier" in err
    assert p.read_text() == text


def test_a_symlink_is_not_followed_or_replaced(trio, tmp_path, capsys):
    real = tmp_path / "real.json"
    run_cli(capsys, *stats_args(trio, "--json", real))
    link = tmp_path / "link.json"
    link.symlink_to(real)
    code, _, err = run_cli(capsys, *stats_args(trio, "--json", link))
    assert code == 1 and "is not an earlier --json report" in err
    assert link.is_symlink()


def test_two_options_naming_one_file_is_a_usage_error(trio, tmp_path, capsys):
    code, _, err = run_cli(capsys, *stats_args(trio, "--json", tmp_path / "x", "--csv", tmp_path / "x"))
    assert code == 2
    assert "--json and --csv name the same file" in err
    assert not (tmp_path / "x").exists()


def test_a_failed_write_leaves_the_earlier_report_and_no_temporary_file(tmp_path):
    p = tmp_path / "r.json"
    reportfile.write_text(p, "json", json.dumps({k: [] for k in ("a", "b", "summary", "tensors", "layers", "modules")}))
    before = p.read_bytes()

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("{\"a\": ")  # part of a report, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(ShadowgraftError) as e:
        reportfile.write(p, "json", full_disk)
    assert str(e.value) == f"{p}: No space left on device; the report was not written and the earlier one is unchanged"
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]


def test_each_kind_recognises_only_its_own_reports(trio, tmp_path, capsys):
    js, cs = tmp_path / "r.json", tmp_path / "r.csv"
    run_cli(capsys, *stats_args(trio, "--json", js, "--csv", cs))
    assert reportfile.is_ours(js, "json") and reportfile.is_ours(cs, "csv")
    assert not reportfile.is_ours(js, "csv") and not reportfile.is_ours(cs, "json")
    assert not reportfile.is_ours(cs, "plot") and not reportfile.is_ours(tmp_path / "missing", "json")


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_a_plot_is_marked_and_replaced_by_the_next(trio, tmp_path, capsys, suffix):
    pytest.importorskip("matplotlib")
    (tmp_path / "plots").mkdir()
    p = tmp_path / "plots" / f"s{suffix}"
    for _ in range(2):
        code, _, err = run_cli(capsys, *stats_args(trio, "--plot", p))
        assert (code, err) == (0, "")
    assert reportfile.is_ours(p, "plot")
    assert [q.name for q in p.parent.iterdir()] == [p.name]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
