"""Write an output checkpoint folder atomically.

Everything goes into a sibling temporary folder; the final name appears only
through one ``rename`` once the folder is complete, so a reader never sees a
half-written model, whatever happens to this process. An existing folder is
replaced only after the new one is complete, and only when it is empty or
an earlier output of the same kind (``check_output_path`` and ``OutputDir``
hold the rules of where an output may go).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import glob
import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import ShadowgraftError
from .files import INDEX_NAME, regular_file
from .fp8 import dequantized_config
from .hub import INDEX_PATTERN, LICENSE_FILES, SIDE_FILES
from .shards import Shard
from .record import RECORD_NAME

CHAT_TEMPLATE_DIR = "additional_chat_templates"  # the one sub-folder SIDE_FILES reaches into


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
    (Path(folder) / INDEX_NAME).write_text(json.dumps(index_json(shards), indent=2) + "\n")
    return INDEX_NAME


def side_files(src: Path | None) -> list[Path]:
    """The config, tokenizer, chat template and other small non-weight files of ``src`` that an output copies.

    Exactly the files of ``SIDE_FILES`` (what transformers and its processors
    read) and the license: notes, scripts, weights and training leftovers
    stay behind. Each must be a regular file inside ``src`` (or a Hub-cache
    blob of it, see ``files.py``): a link out of the folder, a FIFO or a
    device refuses the run in one line before anything opens it. Hidden
    files (``.env``, ``.git``) are never copied. Call it before writing, so a
    refusal costs nothing.
    """
    if src is None:
        return []
    found = []
    for p in sorted({p for pat in (*SIDE_FILES, *LICENSE_FILES) for p in src.glob(pat)}):
        if any(part.startswith(".") for part in p.relative_to(src).parts):
            continue
        if p.is_dir() and not p.is_symlink():
            continue
        found.append(regular_file(p, src))
    # Not copied, but its license and language go into the output's card: the same rule.
    readme = src / "README.md"
    if readme.exists() or readme.is_symlink():
        regular_file(readme, src)
    return found


def copy_side_files(files: list[Path], dst: Path, *, dequantized: bool = False) -> list[str]:
    """Copy ``files`` (from ``side_files``) into ``dst``; returns their paths relative to it.

    ``dequantized``: the weights were FP8 and are plain floats now, so
    config.json is rewritten without its ``quantization_config`` (a loader
    would otherwise look for FP8 weights and scales).
    """
    copied = []
    for p in files:
        rel = f"{CHAT_TEMPLATE_DIR}/{p.name}" if p.parent.name == CHAT_TEMPLATE_DIR else p.name
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if dequantized and rel == "config.json":
            (dst / rel).write_text(dequantized_config(p), encoding="utf-8")
        else:
            shutil.copyfile(p, dst / rel)
        copied.append(rel)
    return copied


# What an apply or diff output holds: weights, their index, an adapter's
# config, the side files and license copied from instruct, the card and the record.
_OUR_FILES = ("*.safetensors", INDEX_PATTERN, "adapter_config.json", *SIDE_FILES, *LICENSE_FILES,
              "README.md", RECORD_NAME)


def own_temporary(name: str) -> bool:
    """A lock, temporary or moved-aside folder of this tool's (``.X.shadowgraft-tmp-PID`` and the like)."""
    return name.startswith(".") and ".shadowgraft-" in name


def output_file(entry: Path) -> bool:
    """Whether ``entry`` of an output folder is something ``apply``, ``diff`` or ``train`` writes there."""
    if own_temporary(entry.name):
        return True
    if entry.is_dir() and not entry.is_symlink():
        return entry.name == CHAT_TEMPLATE_DIR and all(p.is_file() and p.suffix == ".jinja" for p in entry.iterdir())
    return not entry.name.startswith(".") and any(fnmatch.fnmatchcase(entry.name, pat) for pat in _OUR_FILES)


def listed(names: list[str]) -> str:
    """Up to four names, and how many more: for a message naming what a folder holds."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_output_path(output: str | os.PathLike, *, inputs=()) -> Path:
    """Refuse an output that would replace or enter an input, the current folder, ``/`` or the home folder.

    An output "enters" an input when it equals it, holds it, or lies inside
    an input folder; links are resolved before comparing. ``inputs`` are the
    specs the user gave (folders, files, Hub ids; those that are no local
    path are skipped). Returns the output as an absolute path. The same rule
    holds with or without ``--overwrite``.

    >>> check_output_path("", inputs=["./instruct"])            # doctest: +SKIP
    ShadowgraftError: the output path is empty (an unset variable?); name a new folder with --output
    """
    text = os.fspath(output)
    if not text.strip():
        raise ShadowgraftError("the output path is empty (an unset variable?); name a new folder with --output")
    final = Path(os.path.realpath(Path(text).expanduser()))
    if final == Path(final.anchor):
        raise ShadowgraftError(f"{text}: is the root folder /; choose a new folder with --output")
    places = [(Path(os.path.realpath(p)), what) for p, what in ((os.getcwd(), "the current folder"), (Path.home(), "your home folder"))]
    for place, what in sorted(places, key=lambda pw: pw[0] != final):  # "is" says more than "holds"
        if place.is_relative_to(final):
            how = "is" if place == final else "holds"
            raise ShadowgraftError(f"{text}: {how} {what}, which an output would replace; choose a new folder with --output")
    for spec in inputs:
        if spec is None:
            continue
        path = Path(os.fspath(spec)).expanduser()
        if not os.path.lexists(path):
            continue  # a Hub id: its files live in the Hub cache
        real = Path(os.path.realpath(path))
        if real.is_relative_to(final):
            how = "is" if real == final else "holds"
            raise ShadowgraftError(f"{text}: {how} the input {os.fspath(spec)}, which an output would replace; "
                                   "choose a new folder with --output")
        folder = real if real.is_dir() else real.parent if real.suffix == ".json" or real.name.startswith("adapter_") else None
        if folder is not None and final.is_relative_to(folder):
            raise ShadowgraftError(f"{text}: lies inside the input folder {os.fspath(spec)}; "
                                   "choose an --output outside every input")
    return final


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


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


@contextmanager
def replacing(folder: Path, *, enabled: bool = True):
    """For a run that fills ``folder`` in place (training) and replaces an earlier one (``--overwrite``):
    the earlier folder is moved aside for the block, put back if the block fails (an error found late,
    NaN, Ctrl-C), and deleted once it succeeds. Yields the aside path (None when nothing was moved)."""
    # Through a link: the run replaces the folder the link names, and the link stays.
    folder = Path(os.path.realpath(folder)) if Path(folder).is_symlink() else Path(folder)
    if enabled:
        for stale in folder.parent.glob(f".{glob.escape(folder.name)}.shadowgraft-previous-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and _alive(int(pid))):
                raise ShadowgraftError(f"{stale}: an earlier run of {folder.name}, moved aside by a run that was killed "
                                       f"before it finished; move it back to {folder} or delete it, then run again")
    if not (enabled and folder.exists()):
        yield None
        return
    aside = folder.with_name(f".{folder.name}.shadowgraft-previous-{os.getpid()}")
    with signals_deferred():
        folder.rename(aside)
    try:
        yield aside
    except BaseException:
        with signals_deferred():
            shutil.rmtree(folder, ignore_errors=True)
            aside.rename(folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDir:
    """Context manager: a temporary folder that becomes ``final`` on success, vanishes on failure.

    >>> with OutputDir(Path("out"), overwrite=False) as tmp:   # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(data)
    """

    def __init__(self, final: str | os.PathLike, *, overwrite: bool = False, inputs=(), marker: str = RECORD_NAME):
        self.spec = os.fspath(final)  # as given: an empty path must not turn into "."
        self.final = Path(final).absolute()
        self.overwrite = overwrite
        self.inputs = tuple(inputs)
        self.marker = marker  # the file an earlier output of this kind holds
        self.tmp = self.final.parent / f".{self.final.name}.shadowgraft-tmp-{os.getpid()}"
        self._lock_fd: int | None = None

    def check(self) -> None:
        """Fail early if the output cannot be created (call before expensive work)."""
        check_output_path(self.spec, inputs=self.inputs)
        if self.final.exists() and not self.overwrite:
            raise ShadowgraftError(f"{self.final}: already exists; pass --overwrite to replace it")
        if self.final.exists() and not self.final.is_dir():
            raise ShadowgraftError(f"{self.final}: exists and is not a folder; remove it or choose another --output")
        if self.final.exists():
            self._check_replaceable()
        parent = self.final.parent
        if not parent.is_dir():
            raise FileNotFoundError(f"{parent}: output's parent folder does not exist; create it first")

    def _check_replaceable(self) -> None:
        # --overwrite replaces what shadowgraft made, never a folder of the user's.
        names = sorted(p.name for p in self.final.iterdir())
        if names and not (self.final / self.marker).is_file():
            raise ShadowgraftError(
                f"{self.final}: holds {listed(names)} but no {self.marker}, so it is not an earlier shadowgraft output and "
                "--overwrite will not replace it; choose another --output, or empty or remove it yourself"
            )
        if self.marker == RECORD_NAME:
            # An earlier graft, delta or adapter, and what the user put in it
            # since (evaluation results, notes): those are not ours to delete.
            foreign = [n for n in names if not output_file(self.final / n)]
            if foreign:
                raise ShadowgraftError(
                    f"{self.final}: an earlier shadowgraft output, but it also holds {listed(foreign)}, which "
                    "shadowgraft did not write; --overwrite will not delete them: move them out first, or choose another --output"
                )

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.final.parent).free
        if nbytes > free:
            raise ShadowgraftError(
                f"{self.final.parent}: the output needs {_size(nbytes)} but only {_size(free)} is free there; "
                "free some space or choose another --output"
            )

    def __enter__(self) -> Path:
        self.check()
        # Ctrl-C between taking the lock and returning would skip __exit__ and leave debris.
        with signals_deferred():
            try:
                self._lock()
            except OSError as e:
                raise self._cannot("create the output there", e) from None
            try:
                self._clean_stale()
                self.check()
                self.tmp.mkdir()
            except OSError as e:
                self._unlock()
                raise self._cannot("create the output there", e) from None
            except BaseException:
                self._unlock()
                raise
        return self.tmp

    def _cannot(self, what: str, e: OSError) -> ShadowgraftError:
        # The user's words, not the errno text naming our lock or temporary folder.
        return ShadowgraftError(f"{self.final}: cannot {what} ({e.strerror or type(e).__name__}); "
                                f"check the permissions of {self.final.parent} or choose another --output")

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
        if isinstance(exc, OSError) and str(self.tmp) in f"{exc.filename}{exc.filename2}":
            raise ShadowgraftError(f"{self.final}: writing failed ({exc.strerror or type(exc).__name__}); "
                                   "nothing was left behind") from exc

    def _commit(self) -> None:
        # No fsync: a killed process loses no page-cache data, and the rename
        # is the commit point. Durability against power loss is the OS's.
        old = None
        if self.final.exists():
            try:
                if not self.overwrite:
                    raise ShadowgraftError(f"{self.final}: appeared while writing; pass --overwrite to replace it")
                self._check_replaceable()  # again: it may have changed while we wrote
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            old = self.final.parent / f".{self.final.name}.shadowgraft-old-{os.getpid()}"
            try:
                os.rename(self.final, old)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise self._cannot("replace the existing folder", e) from None
        try:
            os.rename(self.tmp, self.final)
        except OSError as e:
            if old is not None:
                os.rename(old, self.final)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise self._cannot("put the output in place", e) from None
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

