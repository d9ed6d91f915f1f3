"""Several deltas onto one instruct: weighted sum, TIES and DARE, as pure chunk functions.

Only the fine-tuning deltas ``d_i = T_i - B`` are combined, never
instruct - base: instruction tuning is kept whole and each skill's change is
added on top of it. Everything here works on one chunk of one tensor at a
time, except the TIES threshold, which needs the k-th largest ``|d_i|`` of
the whole tensor (one tensor's ``|d_i|`` held at once, no more).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

METHODS = ("sum", "ties")
_M32 = 0xFFFFFFFF
# An odd 27-bit multiplier with good avalanche: products of a 32-bit value
# stay below 2**63, so int64 arithmetic is exact (no overflow) on every device.
_MUL = 0x45D9F3B


@dataclass(frozen=True)
class Mix:
    """How the deltas of one output combine, per tensor.

    ``sum``: ``sum_i w_i d_i``. ``ties``: trim each ``d_i`` to its
    ``density`` fraction of largest magnitudes, elect the sign of
    ``sum_i w_i d_i`` per element, and average (weighted) the ``d_i`` that
    agree with it. ``dare`` (a keep probability) first drops each element of
    each ``d_i`` with probability ``1 - dare`` and scales the kept ones by
    ``1 / dare``; with DARE, TIES does not trim (DARE has sparsified).
    """

    method: str = "sum"
    weights: tuple[float, ...] = (1.0,)
    density: float = 1.0
    dare: float | None = None
    seed: int = 0

    @property
    def trims(self) -> bool:
        return self.method == "ties" and self.dare is None and self.density < 1.0

    def describe(self) -> dict:
        out: dict = {"method": self.method, "weights": list(self.weights)}
        if self.method == "ties":
            out["density"] = self.density
        if self.dare is not None:
            out.update(sparsify="dare", density=self.dare, seed=self.seed)
        return out


def name_key(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys for ``(seed, tensor name)``; the DARE mask of a tensor depends on nothing else."""
    h = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def dare_keep(seed: int, name: str, start: int, n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which of elements ``[start, start+n)`` of tensor ``name`` DARE keeps (each with probability ``p``).

    A pure function of (seed, name, element index), in integer arithmetic:
    the same bits whatever the chunking, thread count or device.

    >>> dare_keep(0, "w", 0, 8, 0.5).tolist()    # doctest: +SKIP
    """
    k0, k1 = name_key(seed, name)
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    x = _mix32((idx & _M32) ^ k0)
    x = _mix32(x ^ (idx >> 32) ^ k1)
    return x < keep_below(p)


def keep_below(p: float) -> int:
    """The 32-bit hash values under this are kept: ``round(p * 2**32)``."""
    return min(1 << 32, max(0, round(p * (1 << 32))))


def kth_largest(absd: np.ndarray, density: float) -> float:
    """The k-th largest value of ``absd`` for ``k = ceil(density * numel)``; partitions ``absd`` in place.

    In place so that one tensor's ``|d|`` is the only copy held.
    """
    n = absd.size
    k = max(1, math.ceil(density * n))
    if n == 0:
        return 0.0
    absd.partition(n - k)
    return float(absd[n - k])


def combine(ds: list[torch.Tensor], mix: Mix, out: torch.Tensor, scratch: torch.Tensor, votes: torch.Tensor,
            weight_sum: torch.Tensor) -> torch.Tensor:
    """Combine chunk deltas ``ds`` (DARE-masked and TIES-trimmed already) into ``out``.

    ``scratch``, ``votes`` and ``weight_sum`` are work buffers of ``out``'s
    size. Every step is one IEEE operation in the working dtype, in a fixed
    order, so the result depends on neither the device nor the chunking.
    """
    out.zero_()
    if mix.method == "sum":
        for d, w in zip(ds, mix.weights):
            _add_weighted(out, d, w, scratch)
        return out
    # TIES: the sign of the weighted sum is elected per element; the deltas
    # that agree with it (and are not zero) are averaged with their weights.
    votes.zero_()
    for d, w in zip(ds, mix.weights):
        _add_weighted(votes, d, w, scratch)
    votes.sign_()
    weight_sum.zero_()
    for d, w in zip(ds, mix.weights):
        agree = torch.sign(d).eq_(votes).logical_and_(d != 0)
        _add_weighted(out, d.mul_(agree), w, scratch)
        weight_sum.add_(agree, alpha=w)
    # Where nothing agrees out is 0, and 0 / tiny stays 0.
    out.div_(weight_sum.clamp_min_(torch.finfo(out.dtype).tiny))
    # A NaN delta makes its vote NaN, which nothing equals: without this the
    # element would silently become 0 instead of being counted as NaN.
    return out.masked_fill_(votes.isnan(), math.nan)


def _add_weighted(acc: torch.Tensor, d: torch.Tensor, w: float, scratch: torch.Tensor) -> None:
    if w == 1.0:
        acc.add_(d)
    else:
        acc.add_(torch.mul(d, w, out=scratch))
