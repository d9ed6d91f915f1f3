"""The one definition of a checkpoint's files: regular files inside the folder, or Hub-cache blobs of it."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import save_file

from shadowgraft import ShadowgraftError
from shadowgraft.files import file_problem, foreign_entries, locate, regular_file


@pytest.fixture
def no_hang():
    """A check that opened a FIFO would block for ever; turn that into a failure after a few seconds."""
    def boom(signum, frame):
        raise AssertionError("blocked: something opened the FIFO")

    before = signal.signal(signal.SIGALRM, boom)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


def test_regular_files_and_links_that_stay_inside_are_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "real.json").write_text("{}")
    (tmp_path / "alias.json").symlink_to("sub/real.json")
    assert regular_file(tmp_path / "config.json", tmp_path) == tmp_path / "config.json"
    assert file_problem(tmp_path / "alias.json", tmp_path) is None


def test_a_hub_snapshot_link_into_its_own_blobs_is_accepted_and_another_repos_is_not(tmp_path):
    repo = tmp_path / "models--org--m"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text("{}")
    (snap / "config.json").symlink_to("../../blobs/f00d")
    assert file_problem(snap / "config.json", snap) is None
    other = tmp_path / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "beef").write_text("{}")
    (snap / "tokenizer.json").symlink_to(other / "beef")
    assert "is a link pointing outside the checkpoint folder" in file_problem(snap / "tokenizer.json", snap)


def test_a_link_to_proc_environ_is_refused_by_lstat_alone(tmp_path, monkeypatch):
    link = tmp_path / "added_tokens.json"
    link.symlink_to("/proc/self/environ")
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    with pytest.raises(ShadowgraftError) as e:
        regular_file(link, tmp_path)
    assert str(e.value) == (f"{link}: is a link pointing outside the checkpoint folder (to /proc/{os.getpid()}/environ); "
                            "refusing it, put the file itself in the folder")
    assert opened == []


def test_fifo_folder_and_broken_link_are_refused_without_blocking(tmp_path, no_hang):
    os.mkfifo(tmp_path / "model.safetensors")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "gone.json").symlink_to("nowhere.json")
    assert file_problem(tmp_path / "model.safetensors", tmp_path) == (
        f"{tmp_path / 'model.safetensors'}: is a FIFO (named pipe), not a regular file; refusing it, put the real file in its place")
    assert "is a folder, not a regular file" in file_problem(tmp_path / "dir.json", tmp_path)
    assert "is a link to a missing file" in file_problem(tmp_path / "gone.json", tmp_path)
    assert "is missing" in file_problem(tmp_path / "absent.json", tmp_path)


def test_foreign_entries_walks_sub_folders_and_names_each_bad_entry_once(tmp_path, no_hang):
    (tmp_path / "ok.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fine.txt").write_text("x")
    os.mkfifo(tmp_path / "sub" / "pipe")
    (tmp_path / "secret").symlink_to("/proc/self/environ")
    (tmp_path / "elsewhere").symlink_to(tmp_path.parent)
    got = foreign_entries(tmp_path)
    assert len(got) == 3
    assert got[0].startswith(f"{tmp_path / 'elsewhere'}: is a link pointing outside the checkpoint folder")
    assert got[1].startswith(f"{tmp_path / 'secret'}: is a link pointing outside the checkpoint folder")
    assert got[2].startswith(f"{tmp_path / 'sub' / 'pipe'}: is a FIFO")


def test_both_single_file_and_index_read_the_single_file_as_transformers_does(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"b": "model-00001-of-00001.safetensors"}}')
    got = locate(tmp_path)
    assert got.files == (tmp_path / "model.safetensors",) and got.index is None
    assert got.notes == (f"{tmp_path}: holds both model.safetensors and model.safetensors.index.json; reading "
                         "model.safetensors, as transformers does (remove one of them to make the folder unambiguous)",)


def test_a_bare_file_is_held_to_its_own_folder(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"a": torch.zeros(2)}, str(outside))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(ShadowgraftError, match="is a link pointing outside the checkpoint folder"):
        locate(tmp_path / "m" / "adapter_model.safetensors")
    assert locate(outside).files == (outside,) and locate(outside).root is None
