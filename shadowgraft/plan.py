"""Decide, before any byte is written, what happens to every output tensor.

A plan is a list of output shards, each a list of frozen ``Item``s in write
order. Every compatibility check lives here, so a bad input fails before
the output folder exists. ``--dry-run`` prints the plan and stops.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from . import fp8
from .checkpoint import Checkpoint
from .errors import ShadowgraftError
from .header import DTYPE_BITS, TensorInfo
from .mix import Mix
from .naming import SCOPES, in_scope, tower, weight_names
from .prefix import Rename, find
from .shards import Shard, plan_shards


@dataclass(frozen=True)
class LoraTerm:
    """``scale * B @ A`` to add to a weight (``A``: r x in, ``B``: out x r, as PEFT stores them)."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool = False  # fan_in_fan_out: the weight is stored (in, out)
    # PEFT's LoRA on a fused expert parameter (target_parameters) holds
    # ``experts`` experts in one pair: A's rows [e*r, (e+1)*r) and B's
    # columns e, e+E, ... are expert e's. ``expert`` picks one for a file that
    # stores each expert apart (None: the weight is the fused (E, ., .) tensor)
    # and ``rows`` the rows of its change that tensor holds (gate or up half).
    experts: int = 1
    expert: int | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Item:
    """One output tensor: ``copy`` (raw bytes), ``cast`` (dtype change), ``graft`` (compute), ``delta`` (diff)
    or ``scale`` (the block scales of a requantized FP8 graft, written by the engine with that graft).

    A graft adds ``alpha`` times the change of its ``terms``: ``term - base``
    for tuned checkpoints, the term itself for stored deltas (no base),
    combined by ``mix`` when there are several; or ``alpha`` times a LoRA
    product. A ``delta`` item writes ``src - base``. ``fp8`` pairs each FP8
    input with its ``weight_scale_inv``: those inputs are read dequantized,
    and an ``F8_E4M3`` graft is requantized with new scales for ``src``'s.
    """

    name: str
    action: str
    dtype: str  # output dtype code
    src: TensorInfo  # the instruct tensor (the tuned one for ``delta``)
    terms: tuple[TensorInfo, ...] = ()
    base: TensorInfo | None = None
    lora: LoraTerm | None = None
    alpha: float = 1.0
    mix: Mix | None = None
    fp8: tuple[tuple[TensorInfo, TensorInfo], ...] = ()  # (FP8 input, its scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    @property
    def nbytes(self) -> int:
        return self.src.numel * DTYPE_BITS[self.dtype] // 8

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        """Every tensor this item reads, instruct first."""
        return (self.src, *self.terms, *((self.base,) if self.base is not None else ()))


@dataclass(frozen=True)
class Plan:
    shards: tuple[Shard, ...]
    alpha: float  # the default; an item's own alpha may differ (``alpha_for`` rules)
    scope: str
    warnings: tuple[str, ...] = ()  # something the user may not expect (ignored tensors)
    notes: tuple[str, ...] = ()  # what the selection implies (tensors left at instruct's values)
    alpha_for: tuple[tuple[str, float], ...] = ()  # (regex, alpha): first match sets a tensor's alpha
    mix: Mix | None = None
    renames: tuple[tuple[str, Rename], ...] = ()  # (input label, prefix rule onto instruct's names)

    @property
    def items(self) -> list[Item]:
        return [i for s in self.shards for i in s.items]

    @property
    def grafted(self) -> list[str]:
        """Tensors whose values change: grafts, and the rewritten scales of requantized FP8 grafts."""
        return [i.name for i in self.items if i.action in ("graft", "scale")]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def dequantized(self) -> bool:
        """Instruct's FP8 weights are written as plain floats, so config.json loses its quantization_config."""
        return any(i.dtype != fp8.CODE and any(x == i.src for x, _ in i.fp8) for i in self.items)

    def count(self, action: str) -> int:
        return sum(1 for i in self.items if i.action == action)


def select(ck: Checkpoint, *, scope: str = "linear", include: Sequence[str] = (), exclude: Sequence[str] = (),
           floats_only: bool = True) -> Callable[[str], bool]:
    """The tensor-name predicate for ``scope`` narrowed by ``include`` and ``exclude`` regexes.

    A name is selected when it is a floating tensor in scope, matches at least
    one include (if any are given) and matches no exclude. Integer and bool
    tensors (position ids, masks, a quantized ``qweight``) are never selected,
    whatever their shape: they have no change to graft, so they are copied.
    ``floats_only=False`` lifts that rule (``stats`` lists every tensor only
    one checkpoint has). An include that selects nothing in ``ck`` is an
    error naming it, not a silent copy of the whole model.
    """
    if scope not in SCOPES:
        raise ShadowgraftError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")
    inc, exc = compile_patterns(include, "--include"), compile_patterns(exclude, "--exclude")
    quant = fp8.scales(ck)
    # Scales are grafted through their weights, never as tensors of their own.
    scale_names = {s.name for s in quant.values()}

    def in_view(name: str) -> bool:
        t = ck.tensors[name]
        if name in scale_names or floats_only and not (t.is_float or name in quant):
            return False
        sib = next((w for w in weight_names(name) if w in ck.tensors), None)
        wshape = ck.tensors[sib].shape if sib else None
        return in_scope(name, t.shape, scope, wshape)

    for text, rx in zip(include, inc):
        if not any(rx.search(n) and in_view(n) for n in ck.tensors):
            example = next((n for n in ck.tensors if in_view(n)), next(iter(ck.tensors), None))
            like = f" (names look like '{example}')" if example else ""
            raise ShadowgraftError(
                f"--include '{text}' matches no {'floating ' if floats_only else ''}tensor inside --scope {scope} of "
                f"{ck.source}{like}; fix the pattern (a regular expression searched anywhere in the name) or widen --scope")

    def pick(name: str) -> bool:
        if not in_view(name):
            return False
        if inc and not any(r.search(name) for r in inc):
            return False
        return not any(r.search(name) for r in exc)

    return pick


def compile_patterns(patterns: Iterable[str], flag: str) -> list[re.Pattern]:
    """``--include`` / ``--exclude`` regexes, compiled; a bad one is refused naming ``flag``."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ShadowgraftError(f"{flag} '{p}' is not a valid regular expression: {e}") from None
    return out


def plan_graft(
    instruct: Checkpoint,
    *,
    base: Checkpoint | None = None,
    tuned: Checkpoint | Sequence[Checkpoint] | None = None,
    delta: Checkpoint | None = None,
    alpha: float = 1.0,
    alpha_for: Sequence[tuple[str, float]] = (),
    mix: Mix | None = None,
    scope: str = "linear",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str | None = None,
    max_shard_size: int | None = None,
) -> Plan:
    """Plan ``instruct + alpha * (tuned - base)`` (or ``+ alpha * delta``).

    Several ``tuned`` checkpoints (all tuned from ``base``) are combined by
    ``mix``; one tuned checkpoint with a ``mix`` is sparsified by DARE alone.
    """
    tuneds = [tuned] if isinstance(tuned, Checkpoint) else list(tuned or [])
    if (base is None) != (not tuneds) or (delta is not None) == bool(tuneds):
        raise ShadowgraftError("give either --base and --tuned, or --delta")
    if len(tuneds) > 1 and mix is None:
        raise ShadowgraftError("several --tuned for one output need --combine sum or --combine ties")
    pick = select(instruct, scope=scope, include=include, exclude=exclude)
    labels = ["tuned"] if len(tuneds) == 1 else [f"tuned #{k + 1}" for k in range(len(tuneds))]
    sources = dict(zip(labels, tuneds)) if delta is None else {"delta": delta}
    if base is not None:
        sources["base"] = base
    chosen = [n for n in instruct.tensors if pick(n)]
    # Each input seen under instruct's names: a text-only tune of a
    # multimodal model pairs through one prefix rule (prefix.find).
    renames = {label: find(ck.tensors, instruct.tensors, what=label) for label, ck in sources.items()}
    views = {label: {renames[label](n) if renames[label] else n: t for n, t in ck.tensors.items()}
             for label, ck in sources.items()}
    notes = [f"{label}'s tensor names pair with instruct's under prefix change {r} ({len(views[label])} tensors)"
             for label, r in renames.items() if r]
    chosen, absent = _towers_present(chosen, views)
    if absent:
        gone = {tower(n) for n in absent}
        lacking = [label for label, v in views.items() if not gone <= {tower(n) for n in v}]
        notes.append(f"{len(absent)} tensor(s) of tower(s) absent from {' and '.join(lacking)} "
                     f"({', '.join(sorted(gone))}) keep instruct's values: {_names(absent)}")
    quant = {label: fp8.scales(ck) for label, ck in sources.items()}
    _check_inputs(instruct, sources, chosen, views, quant)
    rules = _alpha_rules(alpha_for)
    picked = set(chosen)
    scaled = _Fp8Items(instruct, dtype, picked)
    items = []
    for t in instruct:
        if scaled.is_scale(t.name):
            items += scaled.scale_item(t)
        elif t.name not in picked:
            items.append(_item(t, dtype, fp8=scaled.pairs(t)))
        elif delta is not None:
            d = views["delta"][t.name]
            items.append(_item(t, dtype, terms=(d,), alpha=alpha_of(t.name, alpha, rules), mix=mix,
                               fp8=scaled.pairs(t, (d, quant["delta"]))))
        else:
            terms, b = tuple(views[label][t.name] for label in labels), views["base"][t.name]
            pairs = scaled.pairs(t, *((x, quant[label]) for x, label in zip(terms, labels)), (b, quant["base"]))
            items.append(_item(t, dtype, terms=terms, base=b, alpha=alpha_of(t.name, alpha, rules), mix=mix, fp8=pairs))
    warnings = _unused_warnings(instruct, views, quant)
    first = next(iter(views.values()))
    kept = [n for n in instruct.tensors if n in first and n not in picked | set(absent) and not scaled.is_scale(n)]
    if kept:
        notes.append(f"{len(kept)} tensor(s) outside --scope {scope}/--include/--exclude keep instruct's values: {_names(kept)}")
    notes += scaled.notes(items)
    return Plan(tuple(plan_shards(instruct, items, max_shard_size)), alpha, scope, tuple(warnings), tuple(notes),
                tuple(alpha_for), mix, tuple((label, r) for label, r in renames.items() if r))


def _towers_present(chosen: list[str], views: dict[str, dict[str, TensorInfo]]) -> tuple[list[str], list[str]]:
    """Split ``chosen`` into names whose tower every input holds, and the rest (a text-only tune has no vision tower)."""
    held = set.intersection(*({tower(n) for n in v} for v in views.values()))
    return [n for n in chosen if tower(n) in held], [n for n in chosen if tower(n) not in held]


class _Fp8Items:
    """How instruct's FP8 weights and their scales become output items.

    ``--dtype auto`` keeps instruct's format: a grafted FP8 weight is
    requantized and its scale tensor rewritten (a ``scale`` item); untouched
    weights and scales are copied. An explicit ``--dtype`` writes plain
    floats: every FP8 weight dequantized, no scale tensors.
    """

    def __init__(self, instruct: Checkpoint, dtype: str | None, picked: set[str]):
        self.scales = fp8.scales(instruct)
        self._weight = {s.name: w for w, s in self.scales.items()}
        self._picked = picked
        self._plain = dtype is not None
        if self._plain and self.scales and instruct.root is not None and (instruct.root / fp8.CONFIG).is_file():
            fp8.dequantized_config(instruct.root / fp8.CONFIG)  # fails now, not after the weights are written

    def is_scale(self, name: str) -> bool:
        return name in self._weight

    def scale_item(self, t: TensorInfo) -> list[Item]:
        if self._plain:
            return []
        if self._weight[t.name] in self._picked:
            return [Item(t.name, "scale", t.dtype, t)]
        return [Item(t.name, "copy", t.dtype, t)]

    def notes(self, items: list[Item]) -> list[str]:
        """What happens to instruct's FP8 weights, for the plan's notes."""
        if not self.scales:
            return []
        if self._plain:
            out = next(i.dtype for i in items if i.name in self.scales)
            return [f"instruct's {len(self.scales)} FP8 weight(s) are written dequantized as {out}, without their "
                    "weight_scale_inv tensors; config.json is copied without its quantization_config"]
        grafted = sum(1 for i in items if i.action == "scale")
        return [f"{grafted} grafted FP8 weight(s) are requantized per 128x128 block (scale = amax / 448) and their "
                f"weight_scale_inv rewritten; {len(self.scales) - grafted} other FP8 weight(s) and their scales are copied"]

    def pairs(self, t: TensorInfo, *inputs: tuple[TensorInfo, dict[str, TensorInfo]]) -> tuple:
        """``(FP8 tensor, its scale)`` for instruct's ``t`` and every other ``(tensor, its checkpoint's scales)``.

        Looked up by each tensor's own name, which a text-only tune's prefix change does not touch.
        """
        found = [(t, self.scales)] + list(inputs)
        return tuple((x, q[x.name]) for x, q in found if x.dtype == fp8.CODE and x.name in q)


def _alpha_rules(alpha_for: Sequence[tuple[str, float]]) -> list[tuple[re.Pattern, float]]:
    rules = []
    for pattern, value in alpha_for:
        (rx,) = compile_patterns([pattern], "--alpha-for")
        if not math.isfinite(value):
            raise ShadowgraftError(f"--alpha-for '{pattern}={value}': alpha must be a finite number")
        rules.append((rx, float(value)))
    return rules


def alpha_of(name: str, alpha: float, rules: Sequence[tuple[re.Pattern, float]]) -> float:
    """The first ``--alpha-for`` rule whose regex matches ``name`` sets its alpha; otherwise ``alpha``."""
    for rx, value in rules:
        if rx.search(name):
            return value
    return alpha


def _item(src: TensorInfo, dtype: str | None, *, terms: tuple[TensorInfo, ...] = (), base: TensorInfo | None = None,
          lora: LoraTerm | None = None, alpha: float = 1.0, mix: Mix | None = None, fp8: tuple = ()) -> Item:
    floating = src.is_float or any(x == src for x, _ in fp8)
    out = dtype if dtype and floating else src.dtype
    if terms or lora:
        return Item(src.name, "graft", out, src, terms, base, lora, alpha, mix, fp8)
    if out == src.dtype:
        return Item(src.name, "copy", out, src)
    return Item(src.name, "cast", out, src, fp8=fp8)


def items_with(instruct: Checkpoint, dtype: str | None, lora: dict[str, LoraTerm], *, alpha: float = 1.0,
               alpha_for: Sequence[tuple[str, float]] = ()) -> list[Item]:
    """Items for an adapter graft: tensors in ``lora`` get their low-rank term, the rest copy."""
    rules = _alpha_rules(alpha_for)
    scaled = _Fp8Items(instruct, dtype, set(lora))
    items = []
    for t in instruct:
        if scaled.is_scale(t.name):
            items += scaled.scale_item(t)
        else:
            items.append(_item(t, dtype, lora=lora.get(t.name), alpha=alpha_of(t.name, alpha, rules), fp8=scaled.pairs(t)))
    return items


def _check_inputs(instruct: Checkpoint, sources: dict[str, Checkpoint], chosen: list[str],
                  views: dict[str, dict[str, TensorInfo]], quant: dict[str, dict[str, TensorInfo]]) -> None:
    missing: dict[str, list[str]] = {}
    problems = []
    quant_ins = fp8.scales(instruct)
    for n in chosen:
        t = instruct[n]
        if not (t.is_float or n in quant_ins):
            problems.append(f"'{n}' is {t.dtype} in instruct, which cannot be grafted")
            continue
        for label, ck in views.items():
            if n not in ck:
                missing.setdefault(label, []).append(n)
            elif ck[n].shape != t.shape:
                problems.append(f"'{n}': instruct {tuple(t.shape)} != {label} {tuple(ck[n].shape)}")
            elif not (ck[n].is_float or ck[n].name in quant[label]):
                problems.append(f"'{n}' is {ck[n].dtype} in {label}, which cannot be grafted")
    for label, names in missing.items():
        problems.insert(0, f"{len(names)} tensor(s) missing from {label} ({sources[label].source}): {_names(names)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShadowgraftError("; ".join(problems[:3]) + more + "; exclude them with --exclude REGEX or fix the inputs")


def _unused_warnings(instruct: Checkpoint, views: dict[str, dict[str, TensorInfo]], quant: dict[str, dict]) -> list[str]:
    out = []
    for label, view in views.items():
        # An FP8 source's scales are read with their weights.
        used = {s.name for s in quant[label].values()}
        extra = [n for n, t in view.items() if n not in instruct.tensors and t.name not in used]
        if extra:
            out.append(f"{len(extra)} tensor(s) only in {label} are ignored: {_names(extra)}")
    return out


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")
