"""The compiled one-pass kernels (``_native.c``), when this installation has them.

``pip install`` builds ``shadowgraft._native`` where a C compiler is present;
the extension is optional, so an installation without it, an unusual dtype
or a CUDA tensor falls back to the TorchScript kernels (same metrics, a
few times slower; ``SHADOWGRAFT_NATIVE=0`` forces that, for comparison).
"""

from __future__ import annotations

import os

import torch

try:
    from . import _native
except ImportError:  # built without a C compiler
    _native = None

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_HALF = frozenset({torch.bfloat16, torch.float16})
_GRAFT = _HALF | {torch.float32}


def available() -> bool:
    """True when the compiled kernels are built and not switched off by ``SHADOWGRAFT_NATIVE=0``."""
    return _native is not None and os.environ.get("SHADOWGRAFT_NATIVE", "1") != "0"


def widths() -> list[int]:
    """The vector widths (fp32 lanes) of the compiled sums this CPU runs, the one in use first; [] without them.

    4 everywhere (SSE2, NEON), 8 with AVX2 and 16 with AVX-512 where GCC 7+
    or clang built them (x86-64); the widest runs. Every width gives the
    same bits.
    """
    return _native.widths() if available() else []


def _fits(x: torch.Tensor | None, n: int) -> bool:
    return x is None or (x.device.type == "cpu" and x.dtype in _CODES and x.is_contiguous() and x.numel() == n)


def sums(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, parts: torch.Tensor, step: int) -> bool:
    """Fill ``parts`` (float64, one row of ``metrics.COLS`` per step) as ``metrics._kernel`` does; False when it can't.

    Every sum is taken in one pass over the inputs as stored; see ``_native.c``
    for the order of operations, which is fixed (the same bits on every CPU).
    """
    n = a.numel()
    if not (available() and _fits(a, n) and _fits(b, n) and _fits(t, n) and _table(parts, n, step)):
        return False
    if n == 0:
        return True
    _native.sums(a.data_ptr(), _CODES[a.dtype], b.data_ptr(), _CODES[b.dtype],
                 t.data_ptr() if t is not None else 0, _CODES[t.dtype] if t is not None else 0,
                 n, step, parts.data_ptr())
    return True


# Elements read per input and piece by ``sums_files``: 256 KB of bf16, so the
# pieces of two or three inputs stay in a core's L2 between read and sum.
PIECE = 1 << 17


def _table(parts: torch.Tensor, n: int, step: int) -> bool:
    """``parts`` is the float64 table of one row per step a kernel fills (``metrics.new_parts``)."""
    return (step > 0 and parts.dtype == torch.float64 and parts.device.type == "cpu" and parts.is_contiguous()
            and tuple(parts.shape) == (-(-n // step) or 1, _native.COLS))


def reads(*dtypes: torch.dtype) -> bool:
    """True when ``sums_files`` can read inputs of these dtypes."""
    return available() and all(d in _CODES for d in dtypes)


def sums_files(inputs: list[tuple[int, int, torch.dtype]], n: int, step: int, parts: torch.Tensor,
               buf: torch.Tensor) -> tuple[int, int] | None:
    """``sums`` of 2 or 3 inputs read straight from files: ``(fd, byte offset, dtype)`` each.

    Each byte is read once, ``PIECE`` elements at a time, into ``buf`` (a
    reused buffer of at least ``scratch_bytes()``) and summed while it is in
    cache; the bits are those of ``sums`` on the same values. Returns None, or
    ``(input index, errno)`` of a failed read (errno -1: the file ended).
    """
    # The kernel writes one row per step and a piece per input into these: their sizes are checked here.
    if not (_table(parts, n, step) and buf.is_contiguous() and buf.numel() * buf.element_size() >= scratch_bytes()):
        raise ValueError(f"sums_files: parts must be float64 ({-(-n // step) or 1}, COLS), buf {scratch_bytes()} bytes")
    args = []
    for fd, off, dtype in list(inputs) + [(-1, 0, torch.float32)] * (3 - len(inputs)):
        args += [fd, off, _CODES[dtype]]
    return _native.sums_files(*args, n, step, parts.data_ptr(), buf.data_ptr(), PIECE)


def scratch_bytes() -> int:
    """Bytes of the buffer ``sums_files`` needs: one piece of three inputs of up to 8 bytes an element."""
    return 3 * PIECE * 8


def graft(x: torch.Tensor, base: torch.Tensor | None, term: torch.Tensor, alpha: float, out: torch.Tensor) -> int | None:
    """``fused._graft`` with an fp32 working dtype in one pass, into a bf16 output on the CPU: the NaN/Inf count, or None.

    The same fp32 operations in the same order as the TorchScript kernel,
    the output rounded as torch rounds (NaN to 0xffff), so the same bits.
    Inputs bf16, fp16 or fp32; the caller decides that fp32 is the working
    dtype (the engine's ``wants_float64`` says when it is not).
    """
    n = out.numel()
    ok = available() and out.dtype == torch.bfloat16 and out.is_contiguous() and out.device.type == "cpu"
    if not ok or not all(v is None or (_fits(v, n) and v.dtype in _GRAFT) for v in (x, base, term)):
        return None
    if n == 0:
        return 0
    return _native.graft(x.data_ptr(), _CODES[x.dtype], base.data_ptr() if base is not None else 0,
                         _CODES[base.dtype] if base is not None else 0, term.data_ptr(), _CODES[term.dtype], n,
                         float(alpha), out.data_ptr())


def delta(base: torch.Tensor, term: torch.Tensor, out: torch.Tensor) -> int | None:
    """``out = fp32(term) - fp32(base)`` for bf16/fp16 inputs on the CPU (what ``diff`` stores): NaN/Inf count, or None.

    One correctly rounded fp32 subtraction, so the same bits as the exact
    difference rounded once to fp32, the engine's float64 path's result.
    """
    n = out.numel()
    ok = available() and out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu"
    if not ok or not all(_fits(v, n) and v.dtype in _HALF for v in (base, term)):
        return None
    if n == 0:
        return 0
    return _native.delta(base.data_ptr(), _CODES[base.dtype], term.data_ptr(), _CODES[term.dtype], n, out.data_ptr())
