"""Open a checkpoint (folder, single file, index, or Hub id) and reach its bytes.

``Checkpoint`` is the only way the rest of shadowgraft touches tensor data.
It reads headers itself (see ``header.py``), never unpickles, and reads
bytes with ``pread`` into caller-owned buffers so that resident memory does
not grow with the model the way a long-lived mmap would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ShadowgraftError
from .header import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# org/name or name, optional @revision; what huggingface_hub accepts as a repo id.
REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+(?:@[\w./-]+)?$")


# A missing path with one of these endings is a mistyped file, not a Hub repo.
_FILE_ENDINGS = (".safetensors", ".json", *PICKLE_SUFFIXES)


def is_repo_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` (that is not an existing path) reads as a Hub id, ``org/name[@revision]``."""
    return (isinstance(spec, str) and bool(REPO_ID.match(spec)) and not spec.startswith((".", "/", "~"))
            and not spec.partition("@")[0].endswith(_FILE_ENDINGS))


@dataclass
class Checkpoint:
    """A set of safetensors files seen as one ``name -> TensorInfo`` map.

    >>> ck = Checkpoint.open("./Qwen3-4B-Instruct")      # doctest: +SKIP
    >>> ck["model.norm.weight"].shape                    # doctest: +SKIP
    (2560,)
    """

    source: str
    root: Path | None  # folder holding config/tokenizer files; None for a bare file
    headers: list[Header]
    tensors: dict[str, TensorInfo]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, spec: str | os.PathLike) -> "Checkpoint":
        """Open a folder, a ``.safetensors`` file, an index file or a Hub id (``org/name[@rev]``)."""
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.exists():
            return cls._open_local(text, path)
        if is_repo_spec(spec):
            from . import hub  # lazy: only Hub users pay for it

            res = hub.resolve(text)
            ck = cls._open_local(text, res.path)
            ck.repo_id, ck.revision, ck.commit = res.repo_id, res.revision, res.commit
            return ck
        raise FileNotFoundError(f"{text}: no such file or folder (and not a Hub repo id)")

    @classmethod
    def _open_local(cls, source: str, path: Path) -> "Checkpoint":
        if path.is_dir():
            root, files = path, _files_in_folder(path)
        elif path.name.endswith(".json"):
            root, files = path.parent, _files_from_index(path)
        elif path.suffix == ".safetensors":
            root, files = None, [path]
        elif path.suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        else:
            raise ShadowgraftError(f"{path}: not a .safetensors file, an index .json or a folder")
        index = files if isinstance(files, dict) else None
        paths = sorted(set(index.values())) if index else files
        headers = [read_header(p) for p in paths]
        tensors: dict[str, TensorInfo] = {}
        for h in headers:
            for t in h.tensors:
                if t.name in tensors:
                    raise ShadowgraftError(
                        f"{source}: tensor '{t.name}' appears in both {tensors[t.name].file.name} and {t.file.name}; "
                        "fix the checkpoint so each tensor is stored once"
                    )
                tensors[t.name] = t
        if index is not None:
            _check_index(source, index, tensors)
        return cls(source=source, root=root, headers=headers, tensors=tensors)

    # -- the map -----------------------------------------------------------

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ShadowgraftError(f"{self.source}: has no tensor '{name}'") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def files(self) -> list[Path]:
        return [h.file for h in self.headers]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def describe(self) -> dict:
        """Provenance: Hub id and resolved commit, or absolute local path; plus content fingerprints.

        A header hash names shapes and dtypes but not values (two checkpoints of
        one architecture share it), so a sampled hash of the data is kept too.
        """
        d: dict = {"source": self.source}
        if self.repo_id:
            d.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        else:
            d["path"] = str(Path(self.source).expanduser().absolute())
        d["header_sha256"] = self.header_hashes()
        d["sample_sha256"] = self.sample_hash()
        return d

    def sample_hash(self, samples: int = 16, size: int = 4096) -> str:
        """sha256 over each file's size and ``samples`` evenly spaced ``size``-byte blocks of its data."""
        h = hashlib.sha256()
        for hd in self.headers:
            fd = self.fd(hd.file)
            end = os.fstat(fd).st_size
            h.update(f"{hd.file.name}:{end}:{hd.sha256}".encode())
            span = max(end - hd.data_start - size, 0)
            for k in range(samples):
                h.update(os.pread(fd, size, hd.data_start + span * k // max(samples - 1, 1)))
        return h.hexdigest()

    def header_hashes(self) -> dict[str, str]:
        """sha256 of each file's header, keyed by file name: the checkpoint's identity."""
        return {h.file.name: h.sha256 for h in self.headers}

    # -- bytes -------------------------------------------------------------

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_into(self, info: TensorInfo, offset: int, buf) -> None:
        """Fill ``buf`` (a writable buffer) with ``info``'s bytes starting ``offset`` bytes in."""
        mv = memoryview(buf).cast("B")
        want, pos, fd = len(mv), info.start + offset, self.fd(info.file)
        if offset + want > info.nbytes:
            raise ValueError(f"read past the end of '{info.name}'")
        done = 0
        while done < want:
            n = os.preadv(fd, [mv[done:]], pos + done)
            if n == 0:
                raise ShadowgraftError(f"{info.file}: file ended inside tensor '{info.name}'; it was truncated, re-download it")
            done += n

    def view(self, name: str):
        """A zero-copy, memory-mapped torch view of one tensor (copy-on-write)."""
        import numpy as np
        import torch

        from .dtypes import torch_dtype

        info = self[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        raw = np.memmap(info.file, dtype=np.uint8, mode="c", offset=info.start, shape=(info.nbytes,))
        return torch.from_numpy(raw).view(torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pickle_refusal(path: Path) -> ShadowgraftError:
    return ShadowgraftError(
        f"{path}: pickle checkpoints are never loaded (they can run code); convert it to safetensors first, "
        "e.g. model.save_pretrained(out, safe_serialization=True)"
    )


def _files_in_folder(folder: Path):
    if (folder / INDEX_NAME).is_file():
        return _files_from_index(folder / INDEX_NAME)
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _files_from_index(indexes[0])
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) == 1:
        return shards
    if len(shards) > 1:
        names = ", ".join(p.name for p in shards[:4])
        raise ShadowgraftError(f"{folder}: {len(shards)} .safetensors files ({names}) but no index; pass one file or add {INDEX_NAME}")
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refusal(pickles[0])
    raise ShadowgraftError(f"{folder}: no .safetensors weights in this folder")


def _files_from_index(index_path: Path) -> dict[str, Path]:
    try:
        obj = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        raise ShadowgraftError(f"{index_path}: not valid JSON; re-download the index") from None
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise ShadowgraftError(f"{index_path}: no 'weight_map' of tensor name -> shard file; re-download the index")
    folder = index_path.parent.resolve()
    shards: dict[str, Path] = {}
    for shard in set(wmap.values()):
        p = Path(shard)
        if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
            raise ShadowgraftError(f"{index_path}: shard name '{shard}' leaves the checkpoint folder; refusing it")
        full = index_path.parent / p
        if not full.is_file():
            raise ShadowgraftError(f"{index_path}: shard '{shard}' is missing; re-download the checkpoint")
        if full.resolve().parent != folder and not _is_hub_blob(full, folder):
            raise ShadowgraftError(f"{index_path}: shard '{shard}' is a link pointing outside the checkpoint folder; refusing it")
        shards[shard] = full
    return {name: shards[shard] for name, shard in wmap.items()}


def _is_hub_blob(full: Path, folder: Path) -> bool:
    # Hub cache snapshots hold symlinks into ../../blobs of the same repo cache.
    target = full.resolve()
    repo = folder.parent.parent
    return folder.parent.name == "snapshots" and target.parent == repo / "blobs"


def _check_index(source: str, index: dict[str, Path], tensors: dict[str, TensorInfo]) -> None:
    for name, path in index.items():
        t = tensors.get(name)
        if t is None or t.file != path:
            raise ShadowgraftError(f"{source}: index maps '{name}' to {path.name}, which does not hold it; re-download the checkpoint")
    extra = [n for n in tensors if n not in index]
    if extra:
        raise ShadowgraftError(f"{source}: tensor '{extra[0]}' in {tensors[extra[0]].file.name} is not in the index; the index is stale")
