"""From per-tensor rows to what a user reads: per layer (keyed by tower and block), per module kind,
per tower, the paper's summary statistics, and the verdict band.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable

from .metrics import DeltaSums, Sums
from .naming import TOWERS, family
from .report import Group, Summary, TensorRow

# Verdict bands on sigma_mean, from published numbers: Llama-3.1-8B base vs
# instruct is about 0.016 (close siblings); the pairs the paper's authors
# graft reach about 0.1 (Qwen3-4B-Base vs Instruct-2507: 0.0562); beyond,
# the two are unlikely to be base and instruct of one release.
CLOSE = 0.03
THRESHOLD = 0.12


def _finite(rows: Iterable[TensorRow]) -> list[TensorRow]:
    return [r for r in rows if math.isfinite(r.sigma)]


def group_rows(rows: list[TensorRow], *, by: str) -> list[Group]:
    """Per-layer (block tensors only, keyed by tower and index: vision block 0 is not text layer 0) or per-module-kind
    aggregates of tensor rows."""
    groups: dict = {}
    for r in rows:
        key = (r.tower, r.layer) if by == "layer" else r.module
        if key is None or by == "layer" and r.layer is None:
            continue
        groups.setdefault(key, []).append(r)
    if by == "layer":
        return [_group(k[1], groups[k], None, tower=k[0]) for k in sorted(groups, key=lambda k: (_tower_rank(k[0]), k[1]))]
    keys = sorted(groups, key=lambda k: (_KIND_ORDER.index(k) if k in _KIND_ORDER else len(_KIND_ORDER), k))
    return [_group(str(k), groups[k], family(k)) for k in keys]


def _tower_rank(t: str) -> int:
    return TOWERS.index(t) if t in TOWERS else len(TOWERS)


# Modules in the order a block runs them, then everything outside blocks.
_KIND_ORDER = ["q", "k", "v", "kv", "qkv", "attn", "o", "router", "gate", "up", "gate_up", "experts", "mlp", "down",
               "norm", "embed", "lm_head", "other"]


def _norms(ok: list[TensorRow]) -> tuple[float, float]:
    """rel_l2 and cosine over the finite tensors only: one NaN tensor leaves the rest measured, as sigma does."""
    if not ok:
        return math.nan, math.nan
    s = sum((r.sums for r in ok), Sums())
    return s.rel_l2, s.cosine


def _group(key, rows: list[TensorRow], fam: str | None, tower: str | None = None) -> Group:
    ok = _finite(rows)
    sig = [r.sigma for r in ok]
    s = sum((r.sums for r in rows), Sums())
    rel_l2, cosine = _norms(ok)
    deltas = [r.delta for r in rows if r.delta is not None]
    d = sum(deltas, DeltaSums()) if deltas else None
    return Group(
        key=key, family=fam, n_tensors=len(rows), numel=s.numel,
        sigma_mean=statistics.fmean(sig) if sig else math.nan,
        sigma_max=max(sig) if sig else math.nan,
        sigma_weighted=_weighted(ok),
        rel_l2=rel_l2, cosine=cosine,
        identical=s.identical, delta_ratio=d.ratio if d else None, delta_cosine=d.cosine if d else None, tower=tower,
    )


def _weighted(rows: list[TensorRow]) -> float:
    n = sum(r.numel for r in rows)
    return sum(r.sigma * r.numel for r in rows) / n if n else math.nan


def band_of(sigma: float, *, close: float = CLOSE, threshold: float = THRESHOLD) -> str:
    """``close`` (graft with alpha 1), ``graftable`` (graft, try an alpha grid) or ``divergent``; ``unknown`` for NaN."""
    if not math.isfinite(sigma):
        return "unknown"
    return "close" if sigma < close else "graftable" if sigma < threshold else "divergent"


def _basis(rows: list[TensorRow]) -> tuple[str, list[TensorRow]]:
    """The paper's selection: the language model's block tensors; else any tower's blocks; else every tensor."""
    lang = [r for r in rows if r.layer is not None and r.tower == "language"]
    block = lang or [r for r in rows if r.layer is not None]
    return ("block", block) if block else ("all", rows)


def tower_summaries(rows: list[TensorRow]) -> dict[str, dict]:
    """Per tower: sigma statistics over its block tensors (all its tensors when it has no blocks, e.g. a projector)."""
    out = {}
    for t in sorted({r.tower for r in rows}, key=_tower_rank):
        basis, use = _basis([r for r in rows if r.tower == t])
        sig = sorted(r.sigma for r in _finite(use))
        out[t] = {"sigma_mean": statistics.fmean(sig) if sig else math.nan,
                  "sigma_median": statistics.median(sig) if sig else math.nan,
                  "sigma_max": sig[-1] if sig else math.nan, "n_tensors": len(sig), "basis": basis}
    return out


def summarize(rows: list[TensorRow], *, threshold: float = THRESHOLD, close: float = CLOSE, tuned: bool = False) -> Summary:
    """The paper's statistics of sigma over the language model's block tensors (all tensors when none has a block
    index), per-tower figures beside them, and a verdict."""
    basis, use = _basis(rows)
    ok = _finite(use)
    sig = sorted(r.sigma for r in ok)
    s = sum((r.sums for r in use), Sums())
    deltas = [r.delta for r in use if r.delta is not None]
    d = sum(deltas, DeltaSums()) if deltas else None
    mean = statistics.fmean(sig) if sig else math.nan
    rel_l2, cosine = _norms(ok)
    summary = Summary(
        sigma_mean=mean, sigma_median=statistics.median(sig) if sig else math.nan,
        sigma_max=sig[-1] if sig else math.nan, sigma_min=sig[0] if sig else math.nan,
        sigma_weighted=_weighted(ok), n_tensors=len(ok), basis=basis, n_compared=len(rows),
        numel=s.numel, rel_l2=rel_l2, cosine=cosine, identical=s.identical,
        n_nonfinite=sum(1 for r in rows if r.sums.nonfinite), threshold=threshold,
        graftable=bool(mean < threshold), verdict="", close=close,
        band=band_of(mean, close=close, threshold=threshold),
        delta_ratio=d.ratio if tuned and d else None, delta_cosine=d.cosine if tuned and d else None,
        towers=tower_summaries(rows),
    )
    return summary.with_verdict(verdict(summary, rows))


def verdict(s: Summary, rows: list[TensorRow], k: int = 3) -> str:
    """One line: graftable or not, and where the checkpoints differ most."""
    if not math.isfinite(s.sigma_mean):
        return "no verdict: every compared tensor has NaN or Inf values"
    what = "sigma_mean" if s.basis == "block" else "sigma_mean (no transformer blocks found: all tensors)"
    many = len(s.towers) > 1
    if many and s.basis == "block":
        lang = any(r.tower == "language" and r.layer is not None for r in rows)
        what = "sigma_mean of the language model" if lang else "sigma_mean over every tower's blocks"
    by_layer = group_rows(rows, by="layer")
    # Only measured groups can be "most divergent": a group whose every tensor holds NaN/Inf has no sigma.
    layers = sorted((g for g in by_layer if math.isfinite(g.sigma_mean)),
                    key=lambda g: -g.sigma_mean)[:k]
    mods = sorted((g for g in group_rows(rows, by="module") if g.family in ("attn", "mlp", "norm") and math.isfinite(g.sigma_mean)),
                  key=lambda g: -g.sigma_mean)[:k]
    where = []
    if layers:
        where.append("layers " + ", ".join(f"{_layer_label(g, many)} ({g.sigma_mean:.4f})" for g in layers))
    if mods:
        where.append("modules " + ", ".join(f"{g.key} ({g.sigma_mean:.4f})" for g in mods))
    most = f"; most divergent: {'; '.join(where)}" if where else ""
    over = [g for g in by_layer if _nz(g.sigma_mean) >= s.threshold]
    warn = f"; but {len(over)} layer(s) are over {s.threshold:g}" if over else ""
    if s.band == "close":
        head = (f"graftable: {what} {s.sigma_mean:.4f} is under {s.close:g}, close siblings "
                f"(Llama-3.1-8B base/instruct: about 0.016); graft with alpha = 1{warn}")
    elif s.band == "graftable":
        head = (f"graftable, try an alpha grid: {what} {s.sigma_mean:.4f} is between {s.close:g} and {s.threshold:g}, "
                f"the range of the pairs the paper grafts (Qwen3-4B Base vs Instruct-2507: 0.0562); "
                f"compare e.g. --alpha 0.5,0.75,1.0{warn}")
    else:
        head = (f"not advisable: {what} {s.sigma_mean:.4f} is over {s.threshold:g}: the weights diverge, "
                "these are likely not base and instruct of one release")
    if s.n_nonfinite:
        head += f" ({s.n_nonfinite} tensor(s) with NaN/Inf left out)"
    if many:
        others = [f"{t} {v['sigma_mean']:.4f}" for t, v in s.towers.items() if t != "language" and math.isfinite(v["sigma_mean"])]
        head += f" (other towers: {', '.join(others)})" if others else ""
    return head + most


def _layer_label(g: Group, many: bool) -> str:
    """``3`` for a one-tower model; ``language 3`` / ``vision 0`` when towers must be told apart."""
    return f"{g.tower} {g.key}" if many else str(g.key)


def _nz(x: float) -> float:
    return x if math.isfinite(x) else -1.0
