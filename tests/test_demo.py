"""``shadowgraft demo`` removes only what it made."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from shadowgraft import ShadowgraftError
from shadowgraft.demo import MARK, claim_workdir, run_demo

from .conftest import run_cli


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_of_the_users_is_refused_untouched(tmp_path, monkeypatch, capsys):
    """The issue's case: `demo --workdir .` emptied the current folder."""
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "demo", "--workdir", ".")
    assert code == 1
    assert err == (f"error: .: holds data, thesis.tex and is not an earlier demo folder (no {MARK}), so the demo "
                   "leaves it alone; pass --workdir with a new or empty folder\n")
    assert _tree(tmp_path) == before


def test_a_second_run_removes_only_what_the_first_made(tmp_path):
    work = tmp_path / "w"
    quiet = Console(file=io.StringIO())
    first = run_demo(work, console=quiet)
    assert first["exact"] == 1.0 and first["max_ulp"] == 0
    (work / "notes.txt").write_text("mine")
    (work / "grafted" / "stale.txt").write_text("left by the demo's own folder: goes with it")
    second = run_demo(work, console=quiet)
    assert sorted(p.name for p in work.iterdir()) == sorted(["base", "grafted", "instruct", MARK, "notes.txt", "tuned"])
    assert (work / "notes.txt").read_text() == "mine" and not (work / "grafted" / "stale.txt").exists()
    assert second["exact"] == 1.0


@pytest.mark.parametrize("made", ['{"made": ["base", "../victim"]}', "not json", '{"made": "base"}'])
def test_a_mark_that_names_more_than_the_demo_makes_is_refused(tmp_path, made):
    work = tmp_path / "w"
    work.mkdir()
    (work / MARK).write_text(made)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep").write_text("x")
    with pytest.raises(ShadowgraftError, match="is not an earlier demo folder"):
        claim_workdir(work)
    assert (tmp_path / "victim" / "keep").read_text() == "x"


def test_a_missing_or_empty_folder_is_used_and_marked(tmp_path):
    for work in (tmp_path / "new" / "deep", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        claim_workdir(work)
        assert [p.name for p in work.iterdir()] == [MARK]
