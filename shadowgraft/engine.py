"""Execute a plan: stream every output tensor to disk in bounded fp32 chunks.

Memory stays flat whatever the model size: inputs are read with ``pread``
into a handful of reused chunk buffers (no mmap pages pile up in RSS), each
chunk is upcast into reused fp32 buffers, combined in place, rounded once to
the output dtype and written straight to the shard. Untouched tensors never
enter Python: their byte ranges are copied by the kernel.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import Checkpoint
from .dtypes import torch_dtype
from .errors import ShadowgraftError
from .header import DTYPE_BITS, TensorInfo
from .stream import CHUNK
from .plan import Item, LoraTerm, Plan, Shard
from .stream import Reader
from .writer import shard_header



@dataclass
class Stats:
    """What a run did, for the summary table and ``shadowgraft.json``."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    grafted: int = 0
    copied: int = 0
    cast: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)


class Engine:
    """Runs plans against open checkpoints. One instance per run; not thread-safe."""

    def __init__(self, checkpoints: list[Checkpoint], *, device: str = "cpu", chunk: int = CHUNK,
                 progress: Callable[[int], None] | None = None):
        self.reader = Reader(checkpoints, device=device)
        self.chunk = chunk
        self.progress = progress or (lambda n: None)
        self.stats = Stats()

    def _load(self, role: str, info: TensorInfo, start: int, n: int) -> torch.Tensor:
        self.stats.bytes_read += n * DTYPE_BITS[info.dtype] // 8
        return self.reader.load(role, info, start, n)

    def _advise(self, item: Item | None) -> None:
        if item is not None and item.action != "copy":
            self.reader.advise(item.src, *item.deltas)

    # -- writing -----------------------------------------------------------

    def write_shard(self, shard: Shard, path: Path, alpha: float) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, shard_header(shard))
            items = shard.items
            k = 0
            while k < len(items):
                self._advise(items[k + 1] if k + 1 < len(items) else None)
                it = items[k]
                if it.action == "copy":
                    # Merge runs of byte-adjacent copies into one kernel call.
                    j = k + 1
                    while j < len(items) and items[j].action == "copy" and items[j].src.file == it.src.file and items[j].src.start == items[j - 1].src.end:
                        j += 1
                    n = items[j - 1].src.end - it.src.start
                    self._copy(it.src, n, fd)
                    self.stats.copied += j - k
                    k = j
                    continue
                self._compute(it, alpha, fd)
                k += 1
        finally:
            os.close(fd)

    def _copy(self, first: TensorInfo, nbytes: int, out_fd: int) -> None:
        src_fd = self.reader.fd(first)
        copy_range(src_fd, first.start, out_fd, nbytes, first)
        self.stats.bytes_read += nbytes
        self.stats.bytes_written += nbytes
        self.progress(nbytes)

    def _compute(self, it: Item, alpha: float, out_fd: int) -> None:
        n = it.src.numel
        dtypes = {it.src.dtype, it.dtype, *(d.dtype for d in it.deltas)}
        # fp32 has 2x the mantissa of a 16-bit input, so one final rounding is
        # (almost always) the correctly rounded result; fp32 inputs need fp64
        # for the same guarantee.
        wd = torch.float64 if dtypes & {"F32", "F64"} else torch.float32
        out_dt, osz = torch_dtype(it.dtype), DTYPE_BITS[it.dtype] // 8
        step = self.chunk
        if it.lora is not None:
            # Low-rank terms are computed a row block at a time.
            cols = it.src.shape[-1] if it.src.shape else 1
            step = max(cols, (self.chunk // max(cols, 1)) * cols)
        bad = 0
        for s in range(0, n, step):
            m = min(step, n - s)
            x = self._load("src", it.src, s, m)
            if it.action == "cast":
                out = self.reader.raw("out", m * osz).view(out_dt)
                out.copy_(x)
            else:
                acc = self.reader.work("acc", m, wd)
                acc.copy_(x)
                if it.deltas:
                    d = self.reader.work("d", m, wd)
                    d.copy_(self._load("d0", it.deltas[0], s, m))
                    if len(it.deltas) == 2:
                        b = self.reader.work("b", m, wd)
                        b.copy_(self._load("d1", it.deltas[1], s, m))
                        d.sub_(b)
                    acc.add_(d, alpha=alpha)
                if it.lora is not None:
                    acc.add_(self._lora_rows(it, s, m, wd), alpha=alpha)
                if not math.isfinite(float(acc.sum())):
                    bad += int((~torch.isfinite(acc)).sum())
                out = self.reader.raw("out", m * osz).view(out_dt)
                out.copy_(acc)
            _write_all(out_fd, out.view(torch.uint8).numpy())
            self.stats.bytes_written += m * osz
            self.progress(m * osz)
        if bad:
            self.stats.nonfinite[it.name] = bad
        if it.action == "cast":
            self.stats.cast += 1
        else:
            self.stats.grafted += 1

    def _lora_rows(self, it: Item, start: int, n: int, wd: torch.dtype) -> torch.Tensor:
        """``scale * (B @ A)`` for the weight's flat elements ``[start, start+n)`` (whole rows)."""
        lo: LoraTerm = it.lora
        ck = lo.adapter
        a = ck.view(lo.a.name).to(wd)
        b = ck.view(lo.b.name).to(wd)
        cols = it.src.shape[-1]
        r0, r1 = start // cols, (start + n) // cols
        if lo.transpose:
            # Weight stored (in, out): its rows are columns of B @ A.
            rows = (b @ a[:, r0:r1]).T
        else:
            rows = b[r0:r1] @ a
        return rows.reshape(-1).mul_(lo.scale)


def _write_all(fd: int, buf) -> None:
    mv = memoryview(buf).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def copy_range(src_fd: int, src_off: int, dst_fd: int, nbytes: int, what: TensorInfo | None = None) -> None:
    """Append ``nbytes`` of ``src_fd`` at ``src_off`` to ``dst_fd`` without passing them through Python.

    ``copy_file_range`` lets the file system share or copy extents in the
    kernel; ``sendfile`` is the fallback for file systems that refuse it.
    """
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < nbytes:
        want = min(nbytes - done, 1 << 30)
        try:
            if use_cfr:
                n = os.copy_file_range(src_fd, dst_fd, want, src_off + done)
            else:
                n = os.sendfile(dst_fd, src_fd, src_off + done, want)
        except OSError as e:
            if use_cfr and e.errno in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                use_cfr = False
                continue
            raise
        if n == 0:
            where = f" inside tensor '{what.name}'" if what else ""
            raise ShadowgraftError(f"{what.file if what else 'input'}: file ended{where}; it was truncated, re-download it")
        done += n
