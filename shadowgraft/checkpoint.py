"""Open a checkpoint (folder, single file, index, or Hub id) and reach its bytes.

``Checkpoint`` is the only way the rest of shadowgraft touches tensor data.
It reads headers itself (see ``header.py``), never unpickles, and reads
bytes with ``pread`` into caller-owned buffers so that resident memory does
not grow with the model the way a long-lived mmap would.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ShadowgraftError
from .fileio import truncated
from .files import PICKLE_SUFFIXES, locate
from .header import Header, TensorInfo, read_header

# org/name or name, optional @revision; what huggingface_hub accepts as a repo id.
REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+(?:@[\w./-]+)?$")


# A missing path with one of these endings is a mistyped file, not a Hub repo.
_FILE_ENDINGS = (".safetensors", ".json", *PICKLE_SUFFIXES)


def is_repo_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` (that is not an existing path) reads as a Hub id, ``org/name[@revision]``.

    ``ok/bsae`` where a local folder ``ok/`` exists is a mistyped local path, not a repo of the org "ok".
    """
    return (isinstance(spec, str) and bool(REPO_ID.match(spec)) and not spec.startswith((".", "/", "~"))
            and not spec.partition("@")[0].endswith(_FILE_ENDINGS) and not _local_parent(spec))


def _local_parent(spec: str) -> Path | None:
    parent = Path(spec.partition("@")[0]).parent
    return parent if parent != Path(".") and parent.is_dir() else None


def missing_path(spec: str | os.PathLike, what: str = "file or folder") -> FileNotFoundError:
    """The error for a path that does not exist and is not read as a Hub id."""
    text = os.fspath(spec)
    parent = _local_parent(text) if isinstance(spec, str) else None
    if parent is not None:
        return FileNotFoundError(f"{text}: no such {what} in the local folder {parent}/ (so it is not read as a Hub "
                                 "repo id); check the spelling")
    return FileNotFoundError(f"{text}: no such {what} (and not a Hub repo id)")


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
    notes: tuple[str, ...] = ()  # choices made while locating the files, worth telling the user
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
        raise missing_path(spec)

    @classmethod
    def _open_local(cls, source: str, path: Path) -> "Checkpoint":
        layout = locate(path)
        index = layout.index
        headers = [_read(p) for p in layout.files]
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
        return cls(source=source, root=layout.root, headers=headers, tensors=tensors, notes=layout.notes)

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
                raise truncated(info)
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


def _read(path: Path) -> Header:
    try:
        return read_header(path)
    except OSError as e:  # e.g. no read permission: say so without the raw errno text
        raise ShadowgraftError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); check its permissions") from None


def _check_index(source: str, index: dict[str, Path], tensors: dict[str, TensorInfo]) -> None:
    for name, path in index.items():
        t = tensors.get(name)
        if t is None or t.file != path:
            raise ShadowgraftError(f"{source}: index maps '{name}' to {path.name}, which does not hold it; re-download the checkpoint")
    extra = [n for n in tensors if n not in index]
    if extra:
        raise ShadowgraftError(f"{source}: tensor '{extra[0]}' in {tensors[extra[0]].file.name} is not in the index; the index is stale")
