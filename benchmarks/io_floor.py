"""The I/O floor of a graft: read base and tuned once, copy instruct once.

Every graft must read all three inputs and write one output of instruct's
size; this script does exactly that and nothing else, with no torch import:
plain ``readinto`` a reused 16 MB buffer for base and tuned, and an in-kernel
``copy_file_range`` (``sendfile`` where the file system refuses it) of
instruct's weight files into the output folder, which reads instruct too.

    python benchmarks/io_floor.py --read B/*.safetensors T/*.safetensors --copy I/*.safetensors --to OUT

``--threads N`` does the same work on N threads, 64 MB ranges of the files
taken from a shared list (``pread`` and ``copy_file_range`` with offsets
release the GIL): the floor for a tool that reads and writes on every core.
"""

from __future__ import annotations

import argparse
import errno
import os
import threading
from pathlib import Path

RANGE = 64 << 20


def read_all(paths: list[Path], buf: bytearray) -> int:
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def copy_file(src: Path, dst: Path) -> int:
    size = src.stat().st_size
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done, use_cfr = 0, hasattr(os, "copy_file_range")
        while done < size:
            want = min(size - done, 1 << 30)
            try:
                n = os.copy_file_range(fin, fout, want) if use_cfr else os.sendfile(fout, fin, None, want)
            except OSError as e:
                if use_cfr and e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    use_cfr = False
                    continue
                raise
            if n == 0:
                raise OSError(f"{src}: ended early")
            done += n
    finally:
        os.close(fin)
        os.close(fout)
    return size


def parallel(reads: list[Path], copies: list[Path], to: Path | None, threads: int) -> None:
    """``read_all`` and ``copy_file`` of every file, as 64 MB ranges on ``threads`` threads."""
    jobs: list[tuple[Path, Path | None, int, int]] = []
    for src in reads:
        size = src.stat().st_size
        jobs += [(src, None, off, min(RANGE, size - off)) for off in range(0, size, RANGE)]
    for src in copies:
        size = src.stat().st_size
        dst = to / src.name
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        jobs += [(src, dst, off, min(RANGE, size - off)) for off in range(0, size, RANGE)]
    lock, errors = threading.Lock(), []

    def worker() -> None:
        buf = memoryview(bytearray(16 << 20))
        try:
            while True:
                with lock:
                    if not jobs or errors:
                        return
                    src, dst, off, n = jobs.pop(0)
                fin = os.open(src, os.O_RDONLY)
                fout = os.open(dst, os.O_WRONLY) if dst else -1
                try:
                    end = off + n
                    while off < end:
                        want = min(end - off, len(buf))
                        got = os.copy_file_range(fin, fout, want, off, off) if dst else os.preadv(fin, [buf[:want]], off)
                        if got == 0:
                            raise OSError(f"{src}: ended early")
                        off += got
                finally:
                    os.close(fin)
                    if fout >= 0:
                        os.close(fout)
        except OSError as e:
            errors.append(e)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--read", nargs="*", default=[], type=Path, help="files read into a reused buffer")
    ap.add_argument("--copy", nargs="*", default=[], type=Path, help="files copied into --to")
    ap.add_argument("--to", type=Path, help="output folder for --copy (created)")
    ap.add_argument("--threads", type=int, default=1, help="threads sharing the work in 64 MB ranges (default 1)")
    a = ap.parse_args()
    if a.copy:
        a.to.mkdir(parents=True, exist_ok=True)
    if a.threads > 1:
        parallel(a.read, a.copy, a.to, a.threads)
        return
    read_all(a.read, bytearray(16 << 20))
    for src in a.copy:
        copy_file(src, a.to / src.name)


if __name__ == "__main__":
    main()
