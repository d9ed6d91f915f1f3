"""Hub ids as inputs (``org/name[@revision]``): which files to fetch, pinned to a commit.

Everything that talks to the Hub goes through huggingface_hub: the cache
layout, tokens, offline mode, progress bars and retries are its own. This
module only chooses which files to fetch, pins the revision to a commit, and
turns huggingface_hub's exceptions into one-line ``ShadowgraftError``s.
Publishing (which needs ``verify``, itself a user of this module) lives in
``publish.py``, so the checkpoint reader never imports the uploader.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ShadowgraftError

# What transformers and its processors read besides the weights, as glob
# patterns relative to the model folder: one list for local copies
# (writer.side_files) and Hub downloads (SIDE_PATTERNS); kept here, where
# importing stays light (writer pulls in torch). Multimodal and
# newer models add processor, image/video preprocessor and chat template
# files; trust_remote_code models name their modules in config.json's auto_map.
SIDE_FILES = (
    "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model", "*.tiktoken",
    "tekken.json",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja",
    "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json", "audio_tokenizer_config.json",
    "configuration_*.py", "modeling_*.py", "tokenization_*.py", "processing_*.py", "image_processing_*.py",
    "video_processing_*.py", "feature_extraction_*.py",
)
# Not read by transformers, but a model's license travels with it.
LICENSE_FILES = ("LICENSE*",)
# Small files a checkpoint needs besides its weights: what transformers reads
# (SIDE_FILES, the list local copies use too), the license, and
# README.md, whose license metadata the model card copies. Pickle weights
# (*.bin, *.pt), GGUF files and optimizer states are never named, so they are
# never downloaded.
SIDE_PATTERNS = (*SIDE_FILES, *LICENSE_FILES, "README.md")
INDEX_PATTERN = "*.safetensors.index.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Resolved:
    """A Hub id pinned to a local snapshot folder."""

    path: Path  # snapshot folder in the Hugging Face cache
    repo_id: str
    revision: str | None  # as asked (branch, tag or commit), None for the default branch
    commit: str | None  # the commit hash the snapshot holds


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``org/name@revision`` into the repo id and the revision (None when absent).

    >>> parse_spec("Qwen/Qwen3-4B-Base@refs/pr/3")
    ('Qwen/Qwen3-4B-Base', 'refs/pr/3')
    """
    repo_id, sep, revision = spec.partition("@")
    if sep and not revision:
        raise ShadowgraftError(f"{spec}: empty revision after '@'; write org/name@branch, @tag or @commit-hash")
    return repo_id, revision or None


def resolve(spec: str, *, patterns: list[str] | None = None) -> Resolved:
    """Download (or find in the cache) what ``spec`` needs and return its snapshot folder.

    With ``patterns`` None, fetches config/tokenizer files and the safetensors
    weights the index names (so extra copies such as a ``consolidated.safetensors``
    are skipped); otherwise exactly the files matching ``patterns``.

    >>> resolve("Qwen/Qwen3-4B-Base@main").commit        # doctest: +SKIP
    '906bfd4b4dc7f14ee4320094d8b41684abff8539'
    """
    repo_id, revision = parse_spec(spec)
    if patterns is not None:
        folder = _snapshot(spec, repo_id, revision, list(patterns))
        return Resolved(folder, repo_id, revision, _commit_of(folder))
    # First the small files; this also pins a branch or tag to its commit.
    folder = _snapshot(spec, repo_id, revision, [*SIDE_PATTERNS, INDEX_PATTERN])
    commit = _commit_of(folder)

    def fetch(names: list[str]) -> Path:
        # A commit's snapshot never changes, so files already in it need no
        # network round trip (which costs retries when the Hub is unreachable).
        if commit and all((folder / n).is_file() for n in names):
            return folder
        return _snapshot(spec, repo_id, commit or revision, [*SIDE_PATTERNS, INDEX_PATTERN, *map(glob.escape, names)])

    shards = _shards_named_by_index(folder)
    if shards is not None:
        # Only the shards the index names: repos that also carry a consolidated
        # copy of the weights would otherwise cost twice the download.
        folder = fetch(shards)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ShadowgraftError(f"{spec}: shard '{missing[0]}' named by the index is not in the snapshot {folder}; "
                                   "run once online to finish the download")
    else:
        folder = fetch(["model.safetensors"])
        if not any(folder.glob("*.safetensors")):
            folder = _snapshot(spec, repo_id, commit or revision, [*SIDE_PATTERNS, "*.safetensors"])
        if not any(folder.glob("*.safetensors")):
            where = f"commit {commit}" if commit else f"revision {revision or 'main'}"
            raise ShadowgraftError(
                f"{spec}: no .safetensors weights at {where} (pickle .bin/.pt weights are never downloaded); "
                "pick a revision with safetensors (e.g. a refs/pr/N conversion) or convert the model"
            )
    return Resolved(folder, repo_id, revision, commit)


def _shards_named_by_index(folder: Path) -> list[str] | None:
    indexes = sorted(folder.glob(INDEX_PATTERN))
    if not indexes:
        return None
    # The checkpoint reader picks the standard name first; fetch for the same one.
    index = folder / "model.safetensors.index.json" if (folder / "model.safetensors.index.json").is_file() else indexes[0]
    try:
        wmap = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        return sorted({str(v) for v in wmap.values()})
    except (ValueError, AttributeError, TypeError):
        raise ShadowgraftError(f"{index}: no valid 'weight_map' in the Hub index; report it to the repo owner") from None


def _commit_of(folder: Path) -> str | None:
    # Cache snapshots are named after the commit they hold.
    return folder.name if _COMMIT.match(folder.name) else None


def is_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is None:
        return bool(constants.HF_HUB_OFFLINE)
    return env.upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> str:
    # Same precedence as huggingface_hub.constants, but read now rather than at its import.
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expandvars(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"])), "hub")
    return constants.HF_HUB_CACHE


def _snapshot(spec: str, repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    offline, cache = is_offline(), _cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                      allow_patterns=patterns))
    except Exception as exc:
        msg = _explain_download(exc, spec=spec, repo_id=repo_id, revision=revision, offline=offline, cache=cache)
        if msg is None:
            raise
        raise ShadowgraftError(msg) from exc


def _explain_download(exc: Exception, *, spec: str, repo_id: str, revision: str | None, offline: bool, cache: str) -> str | None:
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError, RevisionNotFoundError

    rev = revision or "main"
    # A short hash is taken for a branch name, and no branch has that name.
    short = " (a commit hash must have all 40 characters)" if re.fullmatch(r"[0-9a-f]{7,39}", rev) else ""
    if isinstance(exc, HFValidationError):
        return f"{spec}: no such local path, and not a valid Hub repo id ({first_line(exc)}); pass a local folder or org/name[@revision]"
    if isinstance(exc, RevisionNotFoundError):
        return f"{spec}: revision '{rev}' does not exist on the Hub{short}; use an existing branch, tag or full commit hash"
    if type(exc).__name__ == "IncompleteSnapshotError":
        return f"{spec}: the cached snapshot in {cache} is missing files and the Hub cannot be reached; run once online to finish the download"
    if isinstance(exc, LocalEntryNotFoundError):
        repo_dir = Path(cache) / _repo_folder(repo_id)
        if offline and not repo_dir.is_dir():
            return (f"{spec}: no such local path, and not in the Hub cache {cache} with HF_HUB_OFFLINE=1 set; "
                    "run once online to download it, or pass a local folder")
        if offline:
            refs = sorted(str(p.relative_to(repo_dir / "refs")) for p in (repo_dir / "refs").rglob("*") if p.is_file())
            if rev in refs:
                # The ref is cached but the snapshot it points to is not (deleted, or a download cut short).
                commit = (repo_dir / "refs" / rev).read_text().strip()
                return (f"{spec}: the Hub cache {cache} names revision '{rev}' (commit {commit[:12]}) but holds no "
                        "snapshot of it, and HF_HUB_OFFLINE=1 is set; run once online to download it again")
            known = f" (cached refs: {', '.join(refs)})" if refs else ""
            return (f"{spec}: revision '{rev}'{short} is not in the Hub cache {cache}{known} and HF_HUB_OFFLINE=1 is set; "
                    "run once online to fetch it, or name a cached revision")
        return (f"{spec}: the Hub cannot be reached and revision '{rev}' is not in the cache {cache}; "
                "check the network (and HF_ENDPOINT), or pass a local folder")
    return explain_http(exc, repo_id=repo_id, what=spec, hint="", upload=False)


def explain_http(exc: Exception, *, repo_id: str, what: str, hint: str, upload: bool) -> str | None:
    """One line for the Hub's HTTP and network errors, shared by downloads and uploads."""
    from huggingface_hub.utils import DisabledRepoError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return (f"{what}: {repo_id} is gated; request access at https://huggingface.co/{repo_id}, "
                f"then log in with `hf auth login` or set HF_TOKEN{hint}")
    if isinstance(exc, RepositoryNotFoundError):
        lead = "" if upload else "no such local path, and "
        return (f"{what}: {lead}no Hub repo {repo_id} is visible (it does not exist, or it is private and no valid "
                f"token was sent); check the spelling, or log in with `hf auth login` / set HF_TOKEN{hint}")
    if isinstance(exc, DisabledRepoError):
        return f"{what}: {repo_id} is disabled on the Hub{hint}"
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return (f"{what}: the Hub refused access to {repo_id} (HTTP {status}); log in with `hf auth login` or set "
                f"HF_TOKEN to a token with {'write' if upload else 'read'} access{hint}")
    if isinstance(exc, HfHubHTTPError) and status is not None and 400 <= status < 500 and status != 429:
        # A request the Hub will refuse again (a wrong endpoint, a bad name): waiting changes nothing.
        return (f"{what}: the Hub refused the request for {repo_id} (HTTP {status}: {first_line(exc)}); check the repo id, "
                f"the revision and HF_ENDPOINT{hint}")
    if isinstance(exc, HfHubHTTPError):
        return f"{what}: the Hub answered HTTP {status} for {repo_id} ({first_line(exc)}); try again later{hint}"
    if isinstance(exc, _transport_errors()):
        return (f"{what}: network error talking to the Hub ({type(exc).__name__}: {first_line(exc)}); "
                f"check the connection, or set HF_HUB_OFFLINE=1 to use only the cache{hint}")
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 0.x speaks requests, 1.x httpx, 2.x httpx2; each has its own transport error base.
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                      ("requests", "Timeout")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(mod), name))
    return tuple(found)


def _repo_folder(repo_id: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo_id, repo_type="model")


def first_line(exc: Exception) -> str:
    # huggingface_hub messages put the summary first and details (URLs, request ids) on later lines.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__
