"""``push`` (and ``apply --push-to-hub``) with the Hub replaced at HfApi's method boundary."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

import shadowgraft
from shadowgraft import ShadowgraftError, publish
from shadowgraft.diff import diff

from .test_hub import run_cli


class FakeHub:
    """Stands in for the Hub at HfApi's method boundary and records every call."""

    def __init__(self, monkeypatch, remote_files=()):
        # push refuses to run offline; the Hub is replaced below, so nothing can leave the machine.
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        self.calls: list[tuple[str, dict]] = []
        self.remote = list(remote_files)
        fake = self

        def create_repo(self, repo_id, **kw):
            fake.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id, **kw):
            fake.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def list_repo_files(self, repo_id, **kw):
            fake.calls.append(("list_repo_files", {"repo_id": repo_id, **kw}))
            return fake.remote

        def upload_folder(self, **kw):
            # What upload_folder itself would send: every file below the folder, filtered by its patterns.
            root = Path(kw["folder_path"])
            every = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            kw["files"] = list(filter_repo_objects(every, allow_patterns=kw.get("allow_patterns"),
                                                   ignore_patterns=kw.get("ignore_patterns")))
            fake.calls.append(("upload_folder", kw))
            return "https://huggingface.co/commit/1"

        for f in (create_repo, create_branch, list_repo_files, upload_folder):
            monkeypatch.setattr(HfApi, f.__name__, f)

    def names(self):
        return [c[0] for c in self.calls]

    def get(self, name):
        return next(kw for n, kw in self.calls if n == name)


@pytest.fixture
def grafted(tmp_path, trio):
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    return tmp_path / "out"


def test_push_creates_repo_branch_and_uploads_the_folder(grafted, monkeypatch):
    # A repo that held an earlier, 3-shard upload.
    fake = FakeHub(monkeypatch, remote_files=[".gitattributes", "model-00001-of-00002.safetensors", "README.md",
                                              "model-00001-of-00003.safetensors", "onnx/model.safetensors",
                                              "model-00003-of-00003.safetensors", "model.safetensors.index.json"])
    url = publish.push(grafted, "me/graft", private=True, revision="dev", commit_message="first graft")
    assert url == "https://huggingface.co/me/graft/tree/dev"
    assert fake.names() == ["create_repo", "create_branch", "list_repo_files", "upload_folder"]
    assert fake.get("create_repo") == {"repo_id": "me/graft", "private": True, "exist_ok": True, "repo_type": "model"}
    assert fake.get("create_branch") == {"repo_id": "me/graft", "branch": "dev", "exist_ok": True, "repo_type": "model"}
    up = fake.get("upload_folder")
    shards = sorted(p.name for p in grafted.glob("*.safetensors"))
    assert up["repo_id"] == "me/graft" and up["revision"] == "dev" and up["commit_message"] == "first graft"
    assert up["folder_path"] == str(grafted)
    assert up["files"] == sorted(["README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
                                  "shadowgraft.json", "tokenizer_config.json", *shards])
    # Stale root shards go in the same commit; files the folder re-uploads and other folders stay.
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert up["delete_patterns"] == ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert list(filter_repo_objects(fake.remote, allow_patterns=up["delete_patterns"])) == up["delete_patterns"]


def test_push_defaults(grafted, monkeypatch):
    fake = FakeHub(monkeypatch)
    assert publish.push(grafted, "me/graft") == "https://huggingface.co/me/graft"
    assert fake.names() == ["create_repo", "list_repo_files", "upload_folder"]
    assert fake.get("create_repo")["private"] is False
    up = fake.get("upload_folder")
    assert up["revision"] is None and up["delete_patterns"] is None
    assert up["commit_message"].startswith("Shadow-FT graft onto ") and up["commit_message"].endswith("(alpha=1.0, scope=linear)")


def test_apply_push_to_hub(tmp_path, trio, monkeypatch):
    fake = FakeHub(monkeypatch)
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out",
                            push_to_hub="me/graft", private=True)
    assert res.url == "https://huggingface.co/me/graft"
    assert fake.get("create_repo")["private"] is True
    assert fake.get("upload_folder")["folder_path"] == str(tmp_path / "out")


def test_push_cli_prints_the_url(grafted, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    code, out, err = run_cli(["push", str(grafted), "me/graft", "--private", "--revision", "exp", "--commit-message", "m"], capsys)
    assert code == 0, err
    assert out.strip() == "https://huggingface.co/me/graft/tree/exp"
    assert fake.get("upload_folder")["commit_message"] == "m" and fake.get("create_repo")["private"] is True


def test_large_folders_use_upload_large_folder_when_available(grafted, monkeypatch):
    fake = FakeHub(monkeypatch)
    monkeypatch.setattr(publish, "LARGE_FOLDER_BYTES", 1000)

    def upload_large_folder(self, **kw):
        fake.calls.append(("upload_large_folder", kw))

    monkeypatch.setattr(HfApi, "upload_large_folder", upload_large_folder, raising=False)
    publish.push(grafted, "me/big", private=True, revision="r")
    assert fake.names() == ["create_repo", "create_branch", "upload_large_folder"]
    up = fake.get("upload_large_folder")
    allow = up.pop("allow_patterns")
    assert up == {"repo_id": "me/big", "folder_path": str(grafted), "repo_type": "model", "revision": "r", "private": True}
    assert allow == sorted(p.name for p in grafted.iterdir())


def _broken(folder: Path, how: str) -> str:
    shards = sorted(folder.glob("*.safetensors"))
    if how == "truncated":
        data = shards[1].read_bytes()
        shards[1].write_bytes(data[: len(data) - 100])
        return f"{shards[1]}: tensor '[^']+' data_offsets \\[\\d+, \\d+\\] run past the end of the file"
    if how == "missing":
        shards[0].unlink()
        return f"{folder / 'model.safetensors.index.json'}: shard '{shards[0].name}' is missing; re-download the checkpoint"
    if how == "stray":
        (folder / "extra.safetensors").write_bytes(shards[0].read_bytes())
        return f"{folder / 'extra.safetensors'} is not part of the checkpoint \\(the index does not name it\\)"
    if how == "padded":
        with open(shards[0], "ab") as f:
            f.write(bytes(8))
        return f"{shards[0]}: 8 byte\\(s\\) after the last tensor; safetensors refuses such files"
    (folder / "model.safetensors.index.json").unlink()
    return f"{folder}: {len(shards)} .safetensors files \\({shards[0].name}, {shards[1].name}\\) but no index"


@pytest.mark.parametrize("how", ["truncated", "missing", "stray", "padded", "no-index"])
def test_push_refuses_a_broken_folder_before_any_hub_call(grafted, monkeypatch, how):
    fake = FakeHub(monkeypatch)
    pattern = _broken(grafted, how)
    with pytest.raises(ShadowgraftError, match="^not pushed: " + pattern):
        publish.push(grafted, "me/graft")
    assert fake.calls == []


def test_push_offline_is_refused(grafted, monkeypatch):
    fake = FakeHub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShadowgraftError) as exc:
        publish.push(grafted, "me/graft")
    assert str(exc.value) == f"push to me/graft: HF_HUB_OFFLINE=1 is set; unset it to upload {grafted}"
    assert fake.calls == []


def test_push_missing_folder(tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    code, out, err = run_cli(["push", str(tmp_path / "nowhere"), "me/graft"], capsys)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'nowhere'}: no such folder"
    assert fake.calls == []


def test_push_hub_refusal_is_one_line_with_the_retry_command(grafted, monkeypatch):
    httpx2 = pytest.importorskip("httpx2", reason="error objects are built the way huggingface_hub 2.x builds them")
    from huggingface_hub.utils import HfHubHTTPError

    FakeHub(monkeypatch)

    def forbidden(self, repo_id, **kw):
        req = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError("403 Forbidden: you cannot create a repo in namespace other.\nRequest id: x",
                             response=httpx2.Response(403, request=req))

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    with pytest.raises(ShadowgraftError) as exc:
        publish.push(grafted, "other/graft")
    assert str(exc.value) == ("push to other/graft: the Hub refused access to other/graft (HTTP 403); log in with "
                              "`hf auth login` or set HF_TOKEN to a token with write access; "
                              f"then retry: shadowgraft push {grafted} other/graft")


@pytest.mark.parametrize("what", ["environ", "fifo", "folder link"])
def test_push_refuses_a_folder_holding_anything_but_its_own_regular_files(grafted, monkeypatch, what):
    """An upload sends every file of the folder, following links: a link out would publish its target."""
    fake = FakeHub(monkeypatch)
    entry = grafted / {"environ": "added_tokens.json", "fifo": "notes", "folder link": "extra"}[what]
    if what == "environ":
        entry.symlink_to("/proc/self/environ")
    elif what == "fifo":
        os.mkfifo(entry)
    else:
        entry.symlink_to(Path.home())
    want = {"environ": "is a link pointing outside the checkpoint folder", "fifo": r"is a FIFO \(named pipe\)",
            "folder link": "is a link pointing outside the checkpoint folder"}[what]
    with pytest.raises(ShadowgraftError, match=f"^not pushed: {re.escape(str(entry))}: {want}"):
        publish.push(grafted, "me/graft")
    assert fake.calls == []


def test_push_sends_only_the_checked_files_and_names_what_it_left_out(grafted, monkeypatch, capsys):
    """Hidden files (an .env with a token) and sub-folders (a trainer's checkpoint) never reach the Hub."""
    fake = FakeHub(monkeypatch)
    before = sorted(p.name for p in grafted.iterdir())
    (grafted / ".env").write_text("HF_TOKEN=hf_secret\n")
    (grafted / "checkpoint-500").mkdir()
    (grafted / "checkpoint-500" / "optimizer.pt").write_bytes(b"pickle")
    code, out, err = run_cli(["push", str(grafted), "me/graft"], capsys)
    assert code == 0 and out.strip() == "https://huggingface.co/me/graft"
    assert fake.get("upload_folder")["files"] == before
    assert " ".join(err.split()) == "left out (hidden entries and sub-folders are never pushed): .env, checkpoint-500/"


def test_the_default_commit_message_names_a_local_instruct_by_its_folder_name(grafted, monkeypatch):
    fake = FakeHub(monkeypatch)
    publish.push(grafted, "me/graft")
    assert fake.get("upload_folder")["commit_message"] == "Shadow-FT graft onto instruct (alpha=1.0, scope=linear)"


def test_a_folder_without_a_config_is_refused_but_a_delta_is_pushed(grafted, tmp_path, trio, monkeypatch):
    fake = FakeHub(monkeypatch)
    (grafted / "config.json").unlink()
    with pytest.raises(ShadowgraftError, match=f"^not pushed: {re.escape(str(grafted))} has no config.json"):
        publish.push(grafted, "me/graft")
    assert fake.calls == []
    delta = tmp_path / "delta"
    diff(base=trio["base"], tuned=trio["tuned"], output=delta)
    assert not (delta / "config.json").exists()
    publish.push(delta, "me/delta")
    assert fake.get("upload_folder")["files"] == sorted(p.name for p in delta.iterdir())


@pytest.mark.parametrize("branch", ["", "../../x", "a b", "x.lock", "-x"])
def test_a_bad_branch_name_is_a_usage_error(grafted, monkeypatch, capsys, branch):
    fake = FakeHub(monkeypatch)
    code, out, err = run_cli(["push", str(grafted), "me/graft", "--revision", branch], capsys)
    assert code == 2 and "is not a valid branch name" in err
    assert fake.calls == []


@pytest.mark.parametrize("status, reason, text", [
    (404, "Not Found", "the Hub refused the request for me/graft (HTTP 404: 404 Not Found); check the repo id, the revision "
                       "and HF_ENDPOINT"),
    (503, "Service Unavailable", "the Hub answered HTTP 503 for me/graft (503 Service Unavailable); try again later")])
def test_a_client_error_asks_for_a_fix_and_a_server_error_for_patience(grafted, monkeypatch, status, reason, text):
    httpx2 = pytest.importorskip("httpx2", reason="error objects are built the way huggingface_hub 2.x builds them")
    from huggingface_hub.utils import HfHubHTTPError

    FakeHub(monkeypatch)

    def failing(self, repo_id, **kw):
        req = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError(f"{status} {reason}\nRequest id: x", response=httpx2.Response(status, request=req))

    monkeypatch.setattr(HfApi, "create_repo", failing)
    with pytest.raises(ShadowgraftError) as exc:
        publish.push(grafted, "me/graft")
    assert str(exc.value) == f"push to me/graft: {text}; then retry: shadowgraft push {grafted} me/graft"


def test_extra_chat_templates_are_pushed_with_the_checkpoint(grafted, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    (grafted / "additional_chat_templates").mkdir()
    (grafted / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    (grafted / "additional_chat_templates" / "notes.txt").write_text("mine")
    code, out, err = run_cli(["push", str(grafted), "me/graft"], capsys)
    assert code == 0
    assert "additional_chat_templates/tool_use.jinja" in fake.get("upload_folder")["files"]
    assert not any("notes" in f for f in fake.get("upload_folder")["files"])
    assert " ".join(err.split()) == ("left out (hidden entries and sub-folders are never pushed): "
                                     "additional_chat_templates/notes.txt")
