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
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import ShadowgraftError
from .plan import Shard

# Weights of any framework and files we write ourselves are not copied from instruct.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx", ".ot")
INDEX_FILE = "model.safetensors.index.json"
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


def write_index(folder: Path, shards) -> str | None:
    """Write ``model.safetensors.index.json`` when there is more than one shard; returns its name if written."""
    if len(shards) <= 1:
        return None
    (Path(folder) / INDEX_FILE).write_text(json.dumps(index_json(shards), indent=2) + "\n")
    return INDEX_FILE


def check_written(folder: Path, plan, *, what: str = "checkpoint") -> None:
    """Re-open what was written the way a user will, and compare its tensors with the plan."""
    from .checkpoint import Checkpoint

    with Checkpoint.open(folder) as ck:
        if {t.name: (t.dtype, t.shape) for t in ck} != {i.name: (i.dtype, i.shape) for i in plan.items}:
            raise ShadowgraftError(f"{folder}: written {what} does not match the plan; this is a bug, please report it")


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


@contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then deliver them.

    Handlers, not the signal mask: torch's worker threads would still take a
    masked signal and Python would run the handler in the main thread anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    prev = {s: signal.signal(s, lambda num, frame: caught.append(num)) for s in sigs}
    try:
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler set outside Python
        if caught:
            signal.raise_signal(caught[0])


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
        # Ctrl-C between taking the lock and returning would skip __exit__ and leave debris.
        with signals_deferred():
            self._lock()
            try:
                self._clean_stale()
                self.check()
                self.tmp.mkdir()
            except BaseException:
                self._unlock()
                raise
        return self.tmp

    def _lock(self) -> None:
        lock = self.final.parent / f".{self.final.name}.shadowgraft-lock"
        busy = f"{self.final}: another shadowgraft run is writing it; wait for it or choose another --output"
        for _ in range(5):
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ShadowgraftError(busy) from None
            try:
                current = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self._lock_fd = fd
                return
            # The previous holder unlinked the file between our open and flock;
            # whoever holds the file now at that path is the one to contend with.
            os.close(fd)
        raise ShadowgraftError(busy)

    def _clean_stale(self) -> None:
        """Remove what a killed run left for this output; safe because we hold the lock."""
        parent, name = self.final.parent, self.final.name
        tmps = [p for p in parent.iterdir() if p.name.startswith(f".{name}.shadowgraft-tmp-")]
        olds = [p for p in parent.iterdir() if p.name.startswith(f".{name}.shadowgraft-old-")]
        for p in tmps:
            shutil.rmtree(p, ignore_errors=True)
        if olds and not os.path.lexists(self.final):
            # Killed between moving the old output aside and renaming the new
            # one in: the old folder is complete, so put it back.
            olds.sort(key=lambda p: p.stat().st_mtime)
            os.rename(olds.pop(), self.final)
        for p in olds:
            shutil.rmtree(p, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        # A second Ctrl-C must not cut the rename pair or the cleanup in half.
        with signals_deferred():
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

