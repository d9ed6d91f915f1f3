"""Publishing a checkpoint folder to the Hub: check it, create the repo, upload.

Kept apart from ``hub.py`` (resolving ids, used by the checkpoint reader)
because a push first runs ``verify``, which reads checkpoints: one module
for both made an import circle.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
from pathlib import Path

from .errors import ShadowgraftError
from .hub import INDEX_PATTERN, explain_http, first_line, is_offline
from .record import read_record
from .writer import CHAT_TEMPLATE_DIR

# Folders above this go through upload_large_folder (resumable, many commits)
# when the installed huggingface_hub has it. Versions without it (2.x) stream
# large folders through upload_folder itself, in several resumable commits.
LARGE_FOLDER_BYTES = 50 * 10**9


def check_push_target(repo_id: str, *, what: str | None = None) -> None:
    """Refuse, before any work, a push that cannot happen: an invalid repo id, or HF_HUB_OFFLINE set.

    ``what`` names what would be uploaded, for the message.

    >>> check_push_target("me/bad name")         # doctest: +SKIP
    ShadowgraftError: me/bad name: not a valid Hub repo id (Repo id must use alphanumeric chars, ...); use org/name
    """
    check_repo_id(repo_id)
    if is_offline():
        raise ShadowgraftError(f"push to {repo_id}: HF_HUB_OFFLINE=1 is set; unset it to upload" + (f" {what}" if what else ""))


def check_repo_id(repo_id: str) -> None:
    """The Hub's own rule for a repo id (``org/name``: letters, digits, ``-_.``, at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ShadowgraftError(f"{repo_id}: not a valid Hub repo id ({first_line(exc)}); use org/name") from None
def check_branch(name: str) -> None:
    """The parts of git's branch-name rules a typo can break (the Hub applies the rest)."""
    bad = set(" ~^:?*[\\\x7f")
    if (not name or name.startswith(("/", "-", ".")) or name.endswith(("/", ".", ".lock")) or ".." in name
            or "//" in name or "@{" in name or any(c in bad or ord(c) < 32 for c in name)):
        raise ShadowgraftError(f"'{name}' is not a valid branch name; use letters, digits and -_./ (e.g. dev or exp/alpha-0.5)")


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Check that ``folder`` is a complete checkpoint, then upload it to ``repo_id``; returns the repo URL.

    Creates the repo (and the branch ``revision``) when missing. Root-level
    safetensors shards and indexes on the Hub that the folder does not have
    are deleted in the same commit, so a re-sharded model leaves no stale shards.

    >>> push("./out", "me/qwen3-4b-instruct-shadow-math", private=True)   # doctest: +SKIP
    'https://huggingface.co/me/qwen3-4b-instruct-shadow-math'
    """
    from huggingface_hub import HfApi

    path = Path(folder).expanduser()
    check_push_target(repo_id, what=str(path))
    if revision is not None:
        check_branch(revision)
    local = check_folder(path)
    # Exactly the checked files: upload_folder would also send hidden files
    # (an .env with a token) and sub-folders (a trainer's checkpoint-500/).
    allow = sorted(glob.escape(f) for f in local)
    api = HfApi(token=token)
    retry = ["shadowgraft", "push", str(path), repo_id] + (["--revision", revision] if revision else [])
    hint = f"; then retry: {shlex.join(retry)}"
    message = commit_message or _default_message(path)
    with _hub_call(repo_id, hint):
        url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        large = getattr(api, "upload_large_folder", None)
        size = sum((path / f).stat().st_size for f in local)
        if large is not None and size > LARGE_FOLDER_BYTES:
            # Many commits, resumable; it takes no commit message and deletes nothing.
            large(repo_id=repo_id, folder_path=str(path), repo_type="model", revision=revision, private=private,
                  allow_patterns=allow)
        else:
            remote = api.list_repo_files(repo_id, revision=revision, repo_type="model")
            stale = [f for f in remote if "/" not in f and f.endswith((".safetensors", INDEX_PATTERN[1:])) and f not in local]
            api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type="model", revision=revision,
                              commit_message=message, allow_patterns=allow,
                              delete_patterns=[glob.escape(f) for f in stale] or None)
    return f"{url.rstrip('/')}/tree/{revision}" if revision else url


def check_folder(path: Path) -> set[str]:
    """Refuse a folder that is not a complete, loadable safetensors checkpoint; returns its file names.

    Headers are validated against file sizes (a truncated shard fails), the
    index must name exactly the tensors its shards hold, no stray
    ``.safetensors`` file may sit outside the index, and the cheap checks of
    ``shadowgraft verify`` must pass (no bytes outside tensors, the
    safetensors library accepts each file, ``shadowgraft.json`` still matches).
    """
    from .checkpoint import Checkpoint
    from .files import locate, stray_shard, stray_shards
    from .verify import verify

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder")
    if not path.is_dir():
        raise ShadowgraftError(f"not pushed: {path} is not a folder; push uploads a checkpoint folder (shards, index, config)")
    try:
        with Checkpoint.open(path):
            pass
    except ShadowgraftError as exc:
        raise ShadowgraftError(f"not pushed: {exc}") from None
    stray = stray_shards(path, locate(path))
    if stray:
        raise ShadowgraftError(f"not pushed: {stray_shard(path / stray[0])}")
    report = verify(path, full=False)
    if report.problems:
        raise ShadowgraftError(f"not pushed: {report.problems[0]}")
    if not {"config.json", "adapter_config.json"} & {p.name for p in path.iterdir()} \
            and (read_record(path) or {}).get("kind") != "delta":
        raise ShadowgraftError(f"not pushed: {path} has no config.json (nor adapter_config.json), so the Hub copy "
                               "could not be loaded; copy the config of the model it came from into the folder")
    return {rel for rel, sent in _entries(path) if sent}


def _entries(path: Path) -> list[tuple[str, bool]]:
    """Every entry a push looks at, by relative name (a folder's ends in /), and whether it is sent: the folder's own
    visible regular files, and the chat templates in the one sub-folder a checkpoint has (transformers reads
    extra templates there; apply copies them)."""
    out = []
    for e in path.iterdir():
        if e.name == CHAT_TEMPLATE_DIR and e.is_dir() and not e.is_symlink():
            out += [(f"{e.name}/{t.name}", t.suffix == ".jinja" and not t.name.startswith(".") and t.is_file())
                    for t in e.iterdir()]
        else:
            out.append((e.name + ("/" if e.is_dir() else ""), not e.name.startswith(".") and e.is_file()))
    return out


def left_out(path: str | os.PathLike) -> list[str]:
    """What ``push`` does not upload from ``path``: hidden entries and sub-folders (a folder's name ends in /)."""
    return sorted(rel for rel, sent in _entries(Path(path).expanduser()) if not sent)


def _default_message(path: Path) -> str:
    try:
        record = read_record(path) or {}
        ins = record["inputs"]["instruct"]
        # A local path says nothing to the repo's readers and may say too much about this machine.
        name = ins.get("repo_id") or Path(ins.get("path") or ins.get("source")).name
        return f"Shadow-FT graft onto {name} (alpha={record['alpha']}, scope={record['scope']})"
    except (OSError, ShadowgraftError, KeyError, TypeError):
        return "Upload checkpoint with shadowgraft"


@contextlib.contextmanager
def _hub_call(repo_id: str, hint: str):
    from huggingface_hub.utils import HFValidationError

    try:
        yield
    except HFValidationError as exc:
        raise ShadowgraftError(f"{repo_id}: not a valid Hub repo id ({first_line(exc)}); use org/name") from exc
    except Exception as exc:
        msg = explain_http(exc, repo_id=repo_id, what=f"push to {repo_id}", hint=hint, upload=True)
        if msg is None:
            raise
        raise ShadowgraftError(msg) from exc
