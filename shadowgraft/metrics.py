"""Similarity of two tensors, accumulated chunk by chunk.

Every metric is a function of a few float64 running sums, so a tensor can be
read in chunks of any size and the result is the same as in one piece. Two
kernels fill the sums of each chunk: the compiled one (``native.py``, one
pass over the stored bytes, 16 fp32 lanes flushed to float64 lanes every
256 elements, the same bits at every vector width) wherever it is built,
and a TorchScript one over reused fp32 buffers (cascade sums, a few ulps a
chunk) otherwise. They agree to about
1e-7 relative, exactly on counts and on the largest difference (tested).

Values where a denominator is zero are defined, never NaN:

- ``sigma``: 0 when A and B are both all zero (they are identical).
- ``rel_l2``: 0 when A and B are both zero; ``inf`` when A is zero and B is not.
- ``cosine``: 1 when both are zero; 0 when exactly one is zero.
- ``identical``: 1 for a tensor with no elements. An element is identical
  when A - B == 0, so +0 and -0 match and NaN or Inf elements never do.

A NaN or Inf in either input makes sigma, rel_l2 and cosine NaN (counted in
``nan_a`` / ``inf_a`` / ``nan_b`` / ``inf_b``); nothing is silently dropped.
Finite inputs whose sums fp32 cannot hold are summed again in float64
(``from_parts``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from . import native


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
    c = dot / (math.sqrt(sq_x) * math.sqrt(sq_y))  # not sqrt(sq_x * sq_y): that product leaves float64 first
    return max(-1.0, min(1.0, c)) if c == c else c


def _nanmax(x: float, y: float) -> float:
    if x != x or y != y:
        return math.nan
    return x if x >= y else y


# Columns of the per-step table the kernel fills, all fp32 sums of one step.
ABS_A, ABS_B, ABS_D, N_DIFF, SQ_A, SQ_B, SQ_D, MAX_ABS, SQ_T, NEG_DOT = range(10)
COLS = 10


def _kernel(a: torch.Tensor, b: torch.Tensor, t: Optional[torch.Tensor], w: torch.Tensor, parts: torch.Tensor,
            step: int) -> None:
    """Row ``i`` of ``parts`` gets the sums over elements ``[i*step, (i+1)*step)`` of A, B (and T).

    ``w`` is fp32 scratch of at least ``5 * min(step, n)`` elements: the rows
    [A | B | A-B | scratch | T-A] of one step stay in cache between the
    passes. Every sum is an fp32 cascade sum of at most ``step`` elements,
    accurate to a few ulps; steps are added in float64 by the caller.
    """
    n_all = a.numel()
    i = 0
    for s in range(0, n_all, step):
        n = min(step, n_all - s)
        v = w[: 5 * n].view(5, n)
        p = parts[i]
        v[0].copy_(a[s : s + n])
        v[1].copy_(b[s : s + n])
        torch.sub(v[0], v[1], out=v[2])
        if t is not None:
            # dT = T - A; <dT, B - A> = -<dT, A - B>.
            v[4].copy_(t[s : s + n])
            v[4].sub_(v[0])
            torch.mul(v[4], v[4], out=v[3])
            p[8] = v[3].sum()
            torch.mul(v[4], v[2], out=v[3])
            p[9] = v[3].sum()
        x = v[:3]
        x.abs_()
        # sign(|A-B|) is 1 where the elements differ, 0 where they are equal.
        torch.sign(v[2], out=v[3])
        p[0:4].copy_(v[:4].sum(1))
        p[7] = torch.amax(v[2])
        x.mul_(x)
        p[4:7].copy_(x.sum(1))
        i += 1


def scratch_elements(n: int, step: int) -> int:
    """fp32 elements of the kernel's scratch for ``n`` elements in steps of ``step``: five rows of one step."""
    return max(1, 5 * min(step, n))


def kernel():
    """``_kernel`` compiled by TorchScript, or ``_kernel`` itself where TorchScript is unavailable.

    Why TorchScript: a scripted loop runs its torch ops without taking the
    GIL between them, so stats threads scale with the cores; as plain Python
    two threads queue for the GIL at every op (measured on 2 cores: two
    workers reach 1.7x the throughput of one, and plain Python 10-20% less).
    The ops and their order are the same either way, and so are the
    results, bit for bit (tested).
    """
    return scripted(_kernel)


def range_sums(a: torch.Tensor, b: torch.Tensor, *, tuned: torch.Tensor | None = None, work: torch.Tensor | None = None,
               step: int = 1 << 18) -> tuple[Sums, DeltaSums | None]:
    """Sums over two 1-D tensors of equal length (any float dtype), computed in fp32 steps.

    ``tuned`` (same length) adds the ``DeltaSums`` of T - A against B - A.
    ``work`` is reused fp32 scratch of at least ``scratch_elements(len, step)`` elements.

    >>> range_sums(torch.tensor([1., -2., 3.]), torch.tensor([1., 2., 0.]))[0].abs_d
    7.0
    """
    n = a.numel()
    parts = new_parts(n, step)
    if not native.sums(a, b, tuned, parts, step):
        if work is None:
            work = torch.empty(scratch_elements(n, step), dtype=torch.float32)
        kernel()(a, b, tuned, work, parts, step)
    return from_parts(parts, n, step, tuned=tuned is not None, values=lambda: (a, b))


def new_parts(n: int, step: int) -> torch.Tensor:
    """The zeroed table a kernel fills for ``n`` elements in steps of ``step``: one float64 row of sums per step."""
    return torch.zeros((-(-n // step) or 1, COLS), dtype=torch.float64)


def from_parts(parts: torch.Tensor, n: int, step: int, *, tuned: bool,
               values: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[Sums, DeltaSums | None]:
    """``Sums`` (and ``DeltaSums`` with ``tuned``) from a kernel's table; ``values()`` gives A and B for the rare recount."""
    tot = parts.sum(0).tolist()
    max_abs = float(parts[:, MAX_ABS].max())
    sq_a, sq_b = tot[SQ_A], tot[SQ_B]
    n_diff, nan_a, inf_a, nan_b, inf_b = int(tot[N_DIFF]), 0, 0, 0, 0
    if not math.isfinite(tot[ABS_A] + tot[ABS_B] + tot[ABS_D] + sq_a + sq_b + tot[SQ_D]) or _underflowed(tot):
        # Rare path: NaN/Inf in an input, or finite values the fp32 steps
        # could not hold (|A - B| or a square past 3.4e38, as F64 or huge F32
        # values give; squares of values under 1e-19 flushed to zero). Count
        # NaN/Inf in the values as stored; where there are none, every sum
        # again in float64, so finite inputs always get finite, right figures.
        a, b = values()
        f64 = [0.0] * 6
        n_diff, max_abs = 0, 0.0
        for s in range(0, n, step):
            x, y = a[s : s + step], b[s : s + step]
            nan_a, nan_b = nan_a + int(torch.isnan(x).sum()), nan_b + int(torch.isnan(y).sum())
            inf_a, inf_b = inf_a + int(torch.isinf(x).sum()), inf_b + int(torch.isinf(y).sum())
            x, y = x.double(), y.double()
            d = x - y
            n_diff += x.numel() - int((d == 0).sum())
            max_abs = _nanmax(max_abs, float(torch.amax(d.abs())) if d.numel() else 0.0)
            for k, v in enumerate((x, y, d)):
                f64[k] += float(v.abs().sum())
                f64[3 + k] += float((v * v).sum())
        if not nan_a + inf_a + nan_b + inf_b:
            tot[ABS_A], tot[ABS_B], tot[ABS_D], sq_a, sq_b, tot[SQ_D] = f64
    sums = Sums(n, tot[ABS_A], tot[ABS_B], tot[ABS_D], sq_a, sq_b, tot[SQ_D], max_abs, n_diff, nan_a, inf_a, nan_b,
                inf_b)
    delta = DeltaSums(tot[SQ_T], tot[SQ_D], 0.0 - tot[NEG_DOT]) if tuned else None  # 0.0, not -0.0
    return sums, delta


def _underflowed(tot: list[float]) -> bool:
    """A square sum of zero beside a nonzero sum of magnitudes: every square flushed to zero in fp32."""
    return any(tot[sq] == 0 and tot[ab] > 0 for sq, ab in ((SQ_A, ABS_A), (SQ_B, ABS_B), (SQ_D, ABS_D)))


def tensor_sums(a: torch.Tensor, b: torch.Tensor, *, tuned: torch.Tensor | None = None, chunk: int = 1 << 18):
    """Sums for two whole tensors of the same number of elements, computed in fp32 chunks.

    Returns ``Sums``, or ``(Sums, DeltaSums)`` when ``tuned`` is given.

    >>> tensor_sums(torch.tensor([1., 2.]), torch.tensor([1., 2.])).sigma
    0.0
    """
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel() or (tuned is not None and tuned.numel() != a.numel()):
        raise ValueError(f"element counts differ: {a.numel()} vs {b.numel()}")
    sums, delta = range_sums(a, b, tuned=tuned.reshape(-1) if tuned is not None else None, step=max(1, chunk))
    return (sums, delta) if tuned is not None else sums


_scripted: dict = {}


def scripted(fn):
    """``fn`` compiled by TorchScript, once; ``fn`` itself where TorchScript is unavailable (same ops, same bits).

    Compiled, a chunk loop runs without taking the GIL between ops, so
    worker threads really run at once.
    """
    if fn not in _scripted:
        try:
            with warnings.catch_warnings():
                # torch marks TorchScript deprecated; it is only a speed-up here.
                warnings.simplefilter("ignore")
                _scripted[fn] = torch.jit.script(fn)
        except Exception:  # no source files, a torch without TorchScript, ...
            _scripted[fn] = fn
    return _scripted[fn]
