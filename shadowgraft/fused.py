"""The plain graft of one chunk, ``out = round(x + alpha * (term - base))``, as one compiled function.

This is the engine's hot path: one tuned checkpoint (or one stored delta),
no mix, no LoRA, 16- or 32-bit floats on the CPU. It performs exactly the
operations of the general path, in the same order, each rounded as there:
upcast ``x``, ``base`` and ``term`` to the working dtype, ``d = term - base``,
``s = alpha * d`` (skipped for alpha 1), ``acc = x + s``, one rounding to the
output dtype; so its bits are the general path's, on every input (tested).
What differs: the function is TorchScript, so it runs without taking the GIL
between ops and several compute workers really run at once, with no Python
between its ops; and the check for NaN/Inf costs one cheap pass.

Where the compiled kernels are built (``native.py``), a bf16 output with
an fp32 working dtype (a bf16 model, or its stored fp32 delta) is computed
there instead, in one pass over memory and with the same bits (tested);
this function remains for fp16 and fp32 outputs, fp32 models, and
installations without them.

Splitting a chunk into steps small enough to stay in L2 between the
passes measured slower on the 2-core development machine (AMD EPYC, 1 MB
L2 a core): 421 / 192 / 151 us per 256K-element bf16 chunk at steps of 8K /
32K / 256K elements, as each op costs about a microsecond to dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch

from .metrics import scripted

DTYPES = frozenset({"BF16", "F16", "F32"})


def _graft(x: torch.Tensor, base: Optional[torch.Tensor], term: torch.Tensor, alpha: float, out: torch.Tensor,
           w: torch.Tensor, squares: bool) -> torch.Tensor:
    """Write ``round(x + alpha * (term - base))`` into ``out``; returns a check sum, finite when ``out`` is.

    ``base`` None: ``term`` is already the change (a stored delta). ``w`` is
    scratch of shape ``(3, n)`` in the working dtype. The check sum is
    non-finite whenever ``out`` holds a NaN or Inf (and, harmlessly, when
    huge finite values overflow it): the caller counts exactly only then.
    ``squares``: the sum of ``acc**2`` before rounding (one fp32 dot, half
    the cost of summing ``out``), valid when the working dtype is fp32 and
    the output bf16 or fp32: a finite sum of squares bounds every value by
    sqrt(fp32 max) = 1.8e19, which rounds to a finite bf16 or fp32, and a
    NaN or Inf makes the sum non-finite. Otherwise the fp32 sum of ``out``.
    """
    acc, b, d = w[0], w[1], w[2]
    acc.copy_(x)
    d.copy_(term)
    if base is not None:
        b.copy_(base)
        d.sub_(b)
    if alpha != 1.0:
        # Two IEEE operations, each rounded (never one fused multiply-add), as _add_scaled.
        torch.mul(d, alpha, out=b)
        acc.add_(b)
    else:
        acc.add_(d)
    out.copy_(acc)
    if squares:
        return torch.dot(acc, acc)
    return out.sum(dtype=torch.float32)


def graft_kernel():
    """``_graft`` compiled by TorchScript; ``_graft`` itself where TorchScript is unavailable (same ops, same bits)."""
    return scripted(_graft)
