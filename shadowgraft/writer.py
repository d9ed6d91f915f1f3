"""Write an output checkpoint folder atomically.

Everything goes into a sibling temporary folder; the final name appears only
through one ``rename`` once the folder is complete, so a reader never sees a
half-written model, whatever happens to this process. An existing folder is
replaced only after the new one is complete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from .errors import ShadowgraftError
from .plan import Shard

# Weights of any framework and files we write ourselves are not copied from instruct.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx", ".ot")
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", "shadowgraft.json", ".gitattributes"}


def shard_header(shard: Shard, metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header for ``shard``, padded with spaces to 8 bytes as safetensors does."""
    head: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for it in shard.items:
        head[it.name] = {"dtype": it.dtype, "shape": list(it.shape), "data_offsets": [off, off + it.nbytes]}
        off += it.nbytes
    body = json.dumps(head, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def index_json(shards: list[Shard] | tuple[Shard, ...]) -> dict:
    return {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {it.name: s.file for s in shards for it in s.items},
    }


def copy_side_files(src: Path | None, dst: Path) -> list[str]:
    """Copy config, tokenizer, chat template and other small non-weight files; returns their names."""
    if src is None:
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in _SKIP_NAMES and not p.name.endswith(_SKIP_SUFFIXES):
            shutil.copyfile(p, dst / p.name)
            copied.append(p.name)
    return copied


class OutputDir:
    """Context manager: a temporary folder that becomes ``final`` on success, vanishes on failure.

    >>> with OutputDir(Path("out"), overwrite=False) as tmp:   # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(data)
    """

    def __init__(self, final: Path, *, overwrite: bool = False):
        self.final = Path(final).absolute()
        self.overwrite = overwrite
        self.tmp = self.final.parent / f".{self.final.name}.shadowgraft-tmp-{os.getpid()}"
        self._lock_fd: int | None = None

    def check(self) -> None:
        """Fail early if the output cannot be created (call before expensive work)."""
        if self.final.exists() and not self.overwrite:
            raise ShadowgraftError(f"{self.final}: already exists; pass --overwrite to replace it")
        if self.final.exists() and not self.final.is_dir():
            raise ShadowgraftError(f"{self.final}: exists and is not a folder; remove it or choose another --output")
        parent = self.final.parent
        if not parent.is_dir():
            raise FileNotFoundError(f"{parent}: output's parent folder does not exist; create it first")

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.final.parent).free
        if nbytes > free:
            raise ShadowgraftError(
                f"{self.final.parent}: needs {nbytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free; free some space or choose another --output"
            )

    def __enter__(self) -> Path:
        self.check()
        lock = self.final.parent / f".{self.final.name}.shadowgraft-lock"
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShadowgraftError(f"{self.final}: another shadowgraft run is writing it; wait for it or choose another --output") from None
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:
            # The previous holder unlinked the file between our open and flock.
            os.close(fd)
            raise ShadowgraftError(f"{self.final}: another shadowgraft run is writing it; wait for it or choose another --output")
        self._lock_fd = fd
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._unlock()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise ShadowgraftError(f"{self.final}: disk full while writing ({os.strerror(exc.errno)}); nothing was left behind, free space and retry") from exc

    def _commit(self) -> None:
        # No fsync: a killed process loses no page-cache data, and the rename
        # is the commit point. Durability against power loss is the OS's.
        old = None
        if self.final.exists():
            if not self.overwrite:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise ShadowgraftError(f"{self.final}: appeared while writing; pass --overwrite to replace it")
            old = self.final.parent / f".{self.final.name}.shadowgraft-old-{os.getpid()}"
            os.rename(self.final, old)
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if old is not None:
                os.rename(old, self.final)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            lock = self.final.parent / f".{self.final.name}.shadowgraft-lock"
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

