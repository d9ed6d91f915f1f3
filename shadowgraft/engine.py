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
from .plan import Item, LoraTerm, Plan, Shard
from .writer import shard_header

# 1M elements: big enough that per-chunk Python overhead vanishes next to the
# memory traffic (~4 MB fp32 per buffer), small enough to stay in L2/L3-ish
# territory and keep the footprint at a few tens of MB.
CHUNK = 1 << 20


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


class _Buffers:
    """Reused scratch tensors, one per role, grown only when a bigger one is asked for."""

    def __init__(self, device: torch.device):
        self.device = device
        self._raw: dict[str, torch.Tensor] = {}
        self._work: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def raw(self, role: str, nbytes: int) -> torch.Tensor:
        buf = self._raw.get(role)
        if buf is None or buf.numel() < nbytes:
            buf = self._raw[role] = torch.empty(max(nbytes, 8), dtype=torch.uint8)
        return buf[:nbytes]

    def work(self, role: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._work.get((role, dtype))
        if buf is None or buf.numel() < n:
            buf = self._work[(role, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n]


class Engine:
    """Runs plans against open checkpoints. One instance per run; not thread-safe."""

    def __init__(self, checkpoints: list[Checkpoint], *, device: str = "cpu", chunk: int = CHUNK,
                 progress: Callable[[int], None] | None = None):
        self._owner = {f: ck for ck in checkpoints for f in ck.files}
        self.device = torch.device(device)
        self.chunk = chunk
        self.progress = progress or (lambda n: None)
        self.bufs = _Buffers(self.device)
        self.stats = Stats()

    # -- reading -----------------------------------------------------------

    def _load(self, role: str, info: TensorInfo, start: int, n: int) -> torch.Tensor:
        """Elements ``[start, start+n)`` of ``info`` as a tensor of its own dtype (a view of a reused buffer)."""
        isz = DTYPE_BITS[info.dtype] // 8
        raw = self.bufs.raw(role, n * isz)
        self._owner[info.file].read_into(info, start * isz, raw.numpy())
        self.stats.bytes_read += n * isz
        return raw.view(torch_dtype(info.dtype))

    def _advise(self, item: Item | None) -> None:
        """Ask the kernel to start reading the next item's inputs while we work on this one."""
        if item is None or item.action == "copy":
            return
        for info in (item.src, *item.deltas):
            ck = self._owner[info.file]
            os.posix_fadvise(ck.fd(info.file), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)

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
        src_fd = self._owner[first.file].fd(first.file)
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
                out = self.bufs.raw("out", m * osz).view(out_dt)
                out.copy_(x)
            else:
                acc = self.bufs.work("acc", m, wd)
                acc.copy_(x)
                if it.deltas:
                    d = self.bufs.work("d", m, wd)
                    d.copy_(self._load("d0", it.deltas[0], s, m))
                    if len(it.deltas) == 2:
                        b = self.bufs.work("b", m, wd)
                        b.copy_(self._load("d1", it.deltas[1], s, m))
                        d.sub_(b)
                    acc.add_(d, alpha=alpha)
                if it.lora is not None:
                    acc.add_(self._lora_rows(it, s, m, wd), alpha=alpha)
                if not math.isfinite(float(acc.sum())):
                    bad += int((~torch.isfinite(acc)).sum())
                out = self.bufs.raw("out", m * osz).view(out_dt)
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
