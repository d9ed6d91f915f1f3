"""Which files make up a checkpoint, and which files shadowgraft may open at all.

One definition, shared by ``Checkpoint``, ``verify``, ``push`` and the check
``apply`` runs on its own output: a checkpoint's files (shards, index,
single file, side files, adapter files) are regular files inside the model
folder. A symlink is followed only when it stays inside the folder, or when
it is what a Hugging Face cache snapshot holds: a link into ``../../blobs/``
of the same repo cache. Everything else (a link out of the folder, a FIFO, a
device, a socket, a folder where a file should be) is refused from ``lstat``
and ``stat`` alone, before anything opens it: opening a FIFO blocks for ever,
and a link to ``/proc/self/environ`` would copy the environment (tokens
included) into an output someone then uploads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ShadowgraftError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def pickle_refusal(path: Path) -> ShadowgraftError:
    return ShadowgraftError(
        f"{path}: pickle checkpoints are never loaded (they can run code); convert it to safetensors first, "
        "e.g. model.save_pretrained(out, safe_serialization=True)"
    )


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def is_hub_blob(target: Path, root: Path) -> bool:
    """Whether resolved ``target`` is a blob of the Hub cache repo whose snapshot is resolved ``root``.

    A snapshot is ``<cache>/models--org--name/snapshots/<commit>/`` and its files
    are links into ``<cache>/models--org--name/blobs/``.
    """
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def file_problem(path: Path, root: Path, *, subject: str | None = None, where: Path | None = None) -> str | None:
    """Why ``path`` is not a regular file inside ``root`` (or a Hub blob of it), or None; opens nothing.

    The line starts with ``where`` (default: ``path``) and speaks of
    ``subject`` (e.g. "shard 'model-00001.safetensors'") when given.

    >>> file_problem(Path("m/added_tokens.json"), Path("m"))     # doctest: +SKIP
    "m/added_tokens.json: is a link pointing outside the checkpoint folder (to /proc/self/environ); ..."
    """
    lead = f"{where or path}: {subject + ' ' if subject else ''}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{lead}is missing; re-download the checkpoint"
    except OSError as e:
        return f"{lead}cannot be examined ({e.strerror}); check its permissions"
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(path))
        home = Path(os.path.realpath(root))
        if not (target.is_relative_to(home) or is_hub_blob(target, home)):
            return (f"{lead}is a link pointing outside the checkpoint folder (to {target}); refusing it, "
                    "put the file itself in the folder")
        try:
            st = os.stat(path)
        except OSError:
            return f"{lead}is a link to a missing file; re-download the checkpoint"
    elif not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        return f"{lead}lies outside the checkpoint folder {root}; refusing it"
    if not stat.S_ISREG(st.st_mode):
        return f"{lead}is {_kind(st.st_mode)}, not a regular file; refusing it, put the real file in its place"
    return None


def regular_file(path: Path, root: Path, *, subject: str | None = None, where: Path | None = None) -> Path:
    """``path``, when it is a regular file inside ``root`` (see ``file_problem``); else one-line ``ShadowgraftError``."""
    problem = file_problem(path, root, subject=subject, where=where)
    if problem:
        raise ShadowgraftError(problem)
    return path


def stray_shards(folder: Path, layout: "Layout") -> list[str]:
    """Names of ``.safetensors`` files in ``folder`` that its checkpoint does not use (the index names none of them)."""
    used = {f.name for f in layout.files}
    return sorted(p.name for p in folder.glob("*.safetensors") if p.name not in used)


def stray_shard(path: Path) -> str:
    return f"{path} is not part of the checkpoint (the index does not name it); remove it or fix the index"


def foreign_entries(folder: Path) -> list[str]:
    """One line per entry under ``folder`` that is neither a folder nor a regular file inside it.

    What ``verify`` flags and ``push`` refuses: an upload sends every file of
    the folder, following links, so a link out of it would publish its target.
    Real sub-folders are walked, links to folders are not followed.
    """
    problems = []
    for top, dirs, names in os.walk(folder):
        for name in sorted(dirs):
            p = Path(top) / name
            if p.is_symlink():
                problems.append(file_problem(p, folder) or f"{p}: is a link to a folder; refusing it, put the files themselves in the folder")
        for name in sorted(names):
            problem = file_problem(Path(top) / name, folder)
            if problem:
                problems.append(problem)
        dirs[:] = sorted(d for d in dirs if not (Path(top) / d).is_symlink())
    return problems


@dataclass(frozen=True)
class Layout:
    """The safetensors files of one checkpoint, found without opening any of them."""

    files: tuple[Path, ...]  # each file once, in reading order
    root: Path | None  # the model folder (config, tokenizer); None for a bare .safetensors file
    index: dict[str, Path] | None = None  # tensor name -> shard, when an index file says so
    index_path: Path | None = None
    notes: tuple[str, ...] = ()  # choices made for the user (e.g. which of two layouts was used)


def locate(path: Path) -> Layout:
    """Find the weight files of a folder, an index ``.json`` or one ``.safetensors`` file, checking each one.

    A folder holding both ``model.safetensors`` and an index is read from
    ``model.safetensors``, as transformers loads it.
    """
    path = Path(path)
    if path.is_dir():
        return _in_folder(path)
    if path.name.endswith(".json"):
        regular_file(path, path.parent)
        index = _from_index(path)
        return Layout(tuple(sorted(set(index.values()))), path.parent, index, path)
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(path)
    if path.suffix != ".safetensors":
        raise ShadowgraftError(f"{path}: not a .safetensors file, an index .json or a folder")
    return Layout((regular_file(path, path.parent),), None)


def _in_folder(folder: Path) -> Layout:
    single, index = folder / SINGLE_NAME, folder / INDEX_NAME
    if os.path.lexists(single):
        notes = ()
        if os.path.lexists(index):
            # transformers' from_pretrained checks model.safetensors first and never reads the index then.
            notes = (f"{folder}: holds both {SINGLE_NAME} and {INDEX_NAME}; reading {SINGLE_NAME}, as transformers "
                     f"does (remove one of them to make the folder unambiguous)",)
        return Layout((regular_file(single, folder),), folder, notes=notes)
    indexes = [index] if os.path.lexists(index) else sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        regular_file(indexes[0], folder)
        found = _from_index(indexes[0])
        return Layout(tuple(sorted(set(found.values()))), folder, found, indexes[0])
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) == 1:
        return Layout((regular_file(shards[0], folder),), folder)
    if len(shards) > 1:
        names = ", ".join(p.name for p in shards[:4])
        raise ShadowgraftError(f"{folder}: {len(shards)} .safetensors files ({names}) but no index; pass one file or add {INDEX_NAME}")
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise pickle_refusal(pickles[0])
    raise ShadowgraftError(f"{folder}: no .safetensors weights in this folder")


def _from_index(index_path: Path) -> dict[str, Path]:
    import json

    from .header import DuplicateKey, unique_keys

    try:
        obj = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as exc:  # which shard holds that tensor would depend on the reader
        raise ShadowgraftError(f"{index_path}: names '{exc.args[0]}' twice; re-download the index") from None
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        raise ShadowgraftError(f"{index_path}: not valid JSON; re-download the index") from None
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise ShadowgraftError(f"{index_path}: no 'weight_map' of tensor name -> shard file; re-download the index")
    shards: dict[str, Path] = {}
    for shard in set(wmap.values()):
        p = Path(shard)
        if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
            raise ShadowgraftError(f"{index_path}: shard name '{shard}' leaves the checkpoint folder; refusing it")
        shards[shard] = regular_file(index_path.parent / p, index_path.parent, subject=f"shard '{shard}'", where=index_path)
    return {name: shards[shard] for name, shard in wmap.items()}


def read_config(root: Path | None) -> dict:
    """``root/config.json`` as a dict: ``{}`` when there is none, it is not a regular file of ``root``, or not a JSON object.

    Used for hints (model type, architectures), never for a decision that
    would be wrong without it.
    """
    import json

    f = Path(root) / "config.json" if root is not None else None
    if f is None or not os.path.lexists(f) or file_problem(f, Path(root)) is not None:
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return cfg if isinstance(cfg, dict) else {}
