"""Chunked reads of tensors into reused buffers: the only read path of the engine and of stats.

``pread`` into a few long-lived buffers keeps resident memory flat (mapped
pages of a long mmap would count in RSS and grow with the model), and the
buffers are reused chunk after chunk, so there is no allocation per chunk.
"""

from __future__ import annotations

import os
import threading
from typing import Iterator

import torch

from .checkpoint import Checkpoint
from .dtypes import torch_dtype
from .fp8 import dequantize_, scale_span
from .header import DTYPE_BITS, TensorInfo

# 256K elements (1 MB per fp32 work buffer): the handful of buffers one
# chunk touches stay in cache between the torch ops that pass over them.
# Measured on the 2-core development machine, marginal cost per GB at 2^17 /
# 2^18 / 2^19 / 2^20 elements was 2.9x / 1.05-1.4x / 1.3-1.8x / 2.5-3.1x the
# I/O floor: smaller chunks pay Python overhead per op, larger ones spill.
CHUNK = 1 << 18


class Reader:
    """Reads element ranges of tensors from any of ``checkpoints`` into reused buffers.

    >>> r = Reader([ck])                                   # doctest: +SKIP
    >>> for start, n in r.spans(info):                     # doctest: +SKIP
    ...     x = r.load("a", info, start, n)                # a view, valid until the next load("a")
    """

    def __init__(self, checkpoints: list[Checkpoint], *, device: str | torch.device = "cpu", chunk: int = CHUNK,
                 pinned: bool = False):
        self._owner = {f: ck for ck in checkpoints for f in ck.files}
        # Page-locked host buffers let CUDA copies run asynchronously.
        self.pinned = pinned
        self.device = torch.device(device)
        self.chunk = chunk
        # Buffers belong to the thread that asked for them, so threads using
        # the same role names (the engine's compute workers) never share one;
        # a thread bound to an owner name gets that owner's, which outlive it.
        self._local = threading.local()
        self._owned: dict[str, dict] = {}

    def bind(self, owner: str) -> None:
        """Give this thread ``owner``'s buffers: the stage of the next shard's pipeline (a new thread) reuses them.

        At most one live thread may be bound to an owner at a time.
        """
        self._local.owned = self._owned.setdefault(owner, {})

    def _buffers(self, kind: str) -> dict:
        mine = self._local.__dict__.get("owned")
        if mine is None:
            mine = self._local.owned = {}
        return mine.setdefault(kind, {})

    def spans(self, info: TensorInfo, chunk: int | None = None) -> Iterator[tuple[int, int]]:
        """``(start, count)`` element ranges covering ``info`` in chunks."""
        n, step = info.numel, chunk or self.chunk
        for s in range(0, n, step):
            yield s, min(step, n - s)

    def raw(self, role: str, nbytes: int) -> torch.Tensor:
        """A reused host byte buffer of at least ``nbytes`` for ``role`` (this thread's)."""
        raw = self._buffers("raw")
        buf = raw.get(role)
        if buf is None or buf.numel() < nbytes:
            buf = raw[role] = torch.empty(max(nbytes, 8), dtype=torch.uint8, pin_memory=self.pinned)
        return buf[:nbytes]

    def work(self, role: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused compute buffer of ``n`` elements on the device (this thread's)."""
        work = self._buffers("work")
        buf = work.get((role, dtype))
        if buf is None or buf.numel() < n:
            buf = work[(role, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n]

    def load(self, role: str, info: TensorInfo, start: int, n: int) -> torch.Tensor:
        """Elements ``[start, start+n)`` of ``info`` in its own dtype, as a view of ``role``'s buffer."""
        isz = DTYPE_BITS[info.dtype] // 8
        raw = self.raw(role, n * isz)
        self._owner[info.file].read_into(info, start * isz, raw.numpy())
        return raw.view(torch_dtype(info.dtype))

    def load_float(self, role: str, info: TensorInfo, start: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Like ``load`` but upcast into a reused ``dtype`` buffer."""
        x = self.load(role, info, start, n)
        w = self.work(role, n, dtype)
        w.copy_(x)
        return w

    def load_value(self, role: str, info: TensorInfo, start: int, n: int, dtype: torch.dtype = torch.float32,
                   scale: TensorInfo | None = None) -> torch.Tensor:
        """Like ``load_float``; an FP8 weight (``scale`` given) comes dequantized, ``[start, start+n)`` whole rows."""
        w = self.load_float(role, info, start, n, dtype)
        if scale is not None:
            s0, sn = scale_span(info.shape, start, n)
            dequantize_(w, self.load(role + ".scale", scale, s0, sn), info.shape[-1], start)
        return w

    def fd(self, info: TensorInfo) -> int:
        return self._owner[info.file].fd(info.file)

    def advise(self, *infos: TensorInfo) -> None:
        """Ask the kernel to start reading these tensors now (read-ahead while we compute), unless they are cached."""
        for info in infos:
            fd = self.fd(info)
            if not _cached(fd, info):
                os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_WILLNEED)


_PROBE = bytearray(1)


def _cached(fd: int, info: TensorInfo) -> bool:
    """Whether the first, middle and last byte of ``info`` are in the page cache (a read that may not wait).

    Advising a cached tensor walks its pages for nothing: 6% of a warm
    ``stats`` run's CPU time (measured). Three probes can miss a hole in
    the middle; then read-ahead only starts later, nothing goes wrong.
    """
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or info.nbytes == 0:
        return False
    try:
        return all(os.preadv(fd, [_PROBE], info.start + k * (info.nbytes - 1) // 2, flag) == 1 for k in range(3))
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a file system without RWF_NOWAIT
        return False
