"""Similarity of two tensors, accumulated chunk by chunk.

Every metric is a function of a few float64 running sums, so a tensor can be
read in chunks of any size and the result is the same as in one piece. The
per-chunk work is fused into as few passes over reused fp32 buffers as torch
allows: one upcast of A and B, one subtraction, one squaring and one
absolute value over the three rows [A | B | A-B], and row sums. fp32 sums in
torch use cascade summation, so a chunk's sum is accurate to a few fp32 ulps;
chunks are then added in float64.

Values where a denominator is zero are defined, never NaN:

- ``sigma``: 0 when A and B are both all zero (they are identical).
- ``rel_l2``: 0 when A and B are both zero; ``inf`` when A is zero and B is not.
- ``cosine``: 1 when both are zero; 0 when exactly one is zero.
- ``identical``: 1 for a tensor with no elements. An element is identical
  when A - B == 0, so +0 and -0 match and NaN or Inf elements never do.

A NaN or Inf in either input makes sigma, rel_l2 and cosine NaN (counted in
``nan_a`` / ``inf_a`` / ``nan_b`` / ``inf_b``); nothing is silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Sums:
    """Float64 running sums over the elements of a pair (A, B) seen so far; add two with ``+``.

    >>> s = tensor_sums(torch.ones(4), torch.zeros(4))
    >>> s.sigma, s.cosine
    (1.0, 0.0)
    """

    numel: int = 0
    abs_a: float = 0.0  # sum |A|
    abs_b: float = 0.0  # sum |B|
    abs_d: float = 0.0  # sum |A - B|
    sq_a: float = 0.0  # sum A^2
    sq_b: float = 0.0
    sq_d: float = 0.0  # sum (A - B)^2
    max_abs: float = 0.0  # max |A - B|
    n_diff: int = 0  # elements where A != B
    nan_a: int = 0
    inf_a: int = 0
    nan_b: int = 0
    inf_b: int = 0

    def __add__(self, o: "Sums") -> "Sums":
        vals = {f.name: getattr(self, f.name) + getattr(o, f.name) for f in fields(self)}
        vals["max_abs"] = _nanmax(self.max_abs, o.max_abs)
        return Sums(**vals)

    @property
    def nonfinite(self) -> int:
        return self.nan_a + self.inf_a + self.nan_b + self.inf_b

    @property
    def sigma(self) -> float:
        """The Shadow-FT relative gap: sum|A-B| / (sum|A| + sum|B|)."""
        return ratio(self.abs_d, self.abs_a + self.abs_b)

    @property
    def same(self) -> bool:
        """Every element equal (and finite), so rel_l2 is 0 and cosine 1 exactly, not up to rounding."""
        return self.n_diff == 0 and self.nonfinite == 0

    @property
    def rel_l2(self) -> float:
        """||A-B|| / ||A||."""
        if self.same:
            return 0.0
        return math.sqrt(self.sq_d) / math.sqrt(self.sq_a) if self.sq_a else (0.0 if self.sq_d == 0 else math.inf)

    @property
    def dot(self) -> float:
        """<A, B>, from ||A||^2 + ||B||^2 - ||A-B||^2 = 2<A,B> (no extra pass over the data).

        Each square sum is good to ~1e-7 relative, so the cosine derived from
        it is good to ~1e-7 absolute when A and B are close (cosine near 1, the
        case that matters here) and to ~1e-6 when they are nearly orthogonal.
        """
        return (self.sq_a + self.sq_b - self.sq_d) / 2

    @property
    def cosine(self) -> float:
        """<A,B> / (||A|| ||B||); clipped to [-1, 1] against rounding."""
        return 1.0 if self.same else cosine(self.dot, self.sq_a, self.sq_b)

    @property
    def identical(self) -> float:
        """Fraction of elements with A == B exactly."""
        return (self.numel - self.n_diff) / self.numel if self.numel else 1.0


@dataclass(frozen=True)
class DeltaSums:
    """Sums for comparing two changes of the same tensor A: dT = T - A and dB = B - A."""

    sq_t: float = 0.0  # ||T - A||^2
    sq_b: float = 0.0  # ||B - A||^2
    dot: float = 0.0  # <T - A, B - A>

    def __add__(self, o: "DeltaSums") -> "DeltaSums":
        return DeltaSums(self.sq_t + o.sq_t, self.sq_b + o.sq_b, self.dot + o.dot)

    @property
    def ratio(self) -> float:
        """||T-A|| / ||B-A||: 0 when T == A, inf when B == A but T differs."""
        if self.sq_t == 0:
            return 0.0
        return math.sqrt(self.sq_t) / math.sqrt(self.sq_b) if self.sq_b else math.inf

    @property
    def cosine(self) -> float:
        """Cosine between T-A and B-A; 0 when either change is zero (it has no direction)."""
        if self.sq_t == 0 or self.sq_b == 0:
            return 0.0
        return cosine(self.dot, self.sq_t, self.sq_b)


def ratio(num: float, den: float) -> float:
    """``num / den`` with 0/0 = 0 (the all-zero case of sigma)."""
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def cosine(dot: float, sq_x: float, sq_y: float) -> float:
    """``dot / sqrt(sq_x * sq_y)``: 1 when both vectors are zero, 0 when one is."""
    if sq_x == 0 and sq_y == 0:
        return 1.0
    if sq_x == 0 or sq_y == 0:
        return 0.0
    c = dot / math.sqrt(sq_x * sq_y)
    return max(-1.0, min(1.0, c)) if c == c else c


def _nanmax(x: float, y: float) -> float:
    if x != x or y != y:
        return math.nan
    return x if x >= y else y


def chunk_sums(w: torch.Tensor, tmp: torch.Tensor, tuned: torch.Tensor | None = None) -> tuple[Sums, DeltaSums | None]:
    """Sums for one chunk. ``w`` is a 1-D fp32 buffer of 3n: A in ``w[:n]``, B in ``w[n:2n]``; scratch after.

    ``tmp`` is scratch of at least 3n fp32 elements. ``tuned`` (n fp32
    elements, overwritten) is T for the three-checkpoint comparison.

    >>> w = torch.zeros(6); w[:2] = torch.tensor([1., 2.]); w[2:4] = torch.tensor([1., 4.])
    >>> chunk_sums(w, torch.empty(6))[0].abs_d
    2.0
    """
    n = w.numel() // 3
    a, b, d = w[:n], w[n : 2 * n], w[2 * n : 3 * n]
    t3 = tmp[: 3 * n]
    torch.sub(a, b, out=d)
    delta = None
    if tuned is not None:
        # dT = T - A; <dT, B - A> = -<dT, A - B>.
        tuned.sub_(a)
        torch.mul(tuned, tuned, out=t3[:n])
        torch.mul(tuned, d, out=t3[n : 2 * n])
        sq_t, neg_dot = t3[: 2 * n].view(2, n).sum(1).tolist()
    torch.mul(w, w, out=t3)
    sq = t3.view(3, n).sum(1)
    w.abs_()
    ab = w.view(3, n).sum(1)
    mx = torch.amax(d) if n else torch.zeros(())
    # sign(|A-B|) is 1 where the elements differ, 0 where they are equal.
    torch.sign(d, out=t3[:n])
    nd = t3[:n].sum()
    sq_a, sq_b, sq_d, abs_a, abs_b, abs_d, max_abs, n_diff = torch.cat((sq, ab, mx.view(1), nd.view(1))).tolist()
    nan_a = inf_a = nan_b = inf_b = 0
    if not math.isfinite(abs_a + abs_b + sq_a + sq_b):
        # Rare path: |x| keeps NaN as NaN and Inf as Inf, so count them now,
        # and recount differences without sign(NaN) poisoning the sum.
        nan_a, nan_b = (int(torch.isnan(x).sum()) for x in (a, b))
        inf_a, inf_b = (int(torch.isinf(x).sum()) for x in (a, b))
        n_diff = n - int((d == 0).sum())
    if tuned is not None:
        delta = DeltaSums(sq_t, sq_d, -neg_dot)
    sums = Sums(n, abs_a, abs_b, abs_d, sq_a, sq_b, sq_d, max_abs, int(n_diff), nan_a, inf_a, nan_b, inf_b)
    return sums, delta


def tensor_sums(a: torch.Tensor, b: torch.Tensor, *, tuned: torch.Tensor | None = None, chunk: int = 1 << 18):
    """Sums for two whole tensors of the same number of elements, computed in fp32 chunks.

    Returns ``Sums``, or ``(Sums, DeltaSums)`` when ``tuned`` is given.

    >>> tensor_sums(torch.tensor([1., 2.]), torch.tensor([1., 2.])).sigma
    0.0
    """
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel() or (tuned is not None and tuned.numel() != a.numel()):
        raise ValueError(f"element counts differ: {a.numel()} vs {b.numel()}")
    n_all = a.numel()
    step = max(1, min(chunk, n_all))
    w = torch.empty(3 * step, dtype=torch.float32)
    tmp = torch.empty(3 * step, dtype=torch.float32)
    tb = torch.empty(step, dtype=torch.float32) if tuned is not None else None
    total, dtotal = Sums(), DeltaSums()
    for s in range(0, n_all, step):
        n = min(step, n_all - s)
        wn = w[: 3 * n]
        wn[:n].copy_(a[s : s + n])
        wn[n : 2 * n].copy_(b[s : s + n])
        tn = None
        if tb is not None:
            tn = tb[:n]
            tn.copy_(tuned.reshape(-1)[s : s + n])
        part, dpart = chunk_sums(wn, tmp, tn)
        total = total + part
        if dpart is not None:
            dtotal = dtotal + dpart
    return (total, dtotal) if tuned is not None else total
