"""The I/O floor of a graft: read base and tuned once, copy instruct once.

Every graft must read all three inputs and write one output of instruct's
size; this script does exactly that and nothing else, with no torch import:
plain ``readinto`` a reused 16 MB buffer for base and tuned, and an in-kernel
``copy_file_range`` (``sendfile`` where the file system refuses it) of
instruct's weight files into the output folder, which reads instruct too.

    python benchmarks/io_floor.py --read B/*.safetensors T/*.safetensors --copy I/*.safetensors --to OUT
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--read", nargs="*", default=[], type=Path, help="files read into a reused buffer")
    ap.add_argument("--copy", nargs="*", default=[], type=Path, help="files copied into --to")
    ap.add_argument("--to", type=Path, help="output folder for --copy (created)")
    a = ap.parse_args()
    read_all(a.read, bytearray(16 << 20))
    if a.copy:
        a.to.mkdir(parents=True, exist_ok=True)
        for src in a.copy:
            copy_file(src, a.to / src.name)


if __name__ == "__main__":
    main()
