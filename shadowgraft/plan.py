"""Decide, before any byte is written, what happens to every output tensor.

A plan is a list of output shards, each a list of frozen ``Item``s in write
order. Every compatibility check lives here, so a bad input fails before
the output folder exists. ``--dry-run`` prints the plan and stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .checkpoint import Checkpoint
from .errors import ShadowgraftError
from .header import DTYPE_BITS, TensorInfo
from .naming import SCOPES, in_scope, sibling_weight


@dataclass(frozen=True)
class LoraTerm:
    """``scale * B @ A`` to add to a weight (``A``: r x in, ``B``: out x r, as PEFT stores them)."""

    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool = False  # fan_in_fan_out: the weight is stored (in, out)
    adapter: Checkpoint | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Item:
    """One output tensor: ``copy`` (raw bytes), ``cast`` (dtype change) or ``graft`` (compute)."""

    name: str
    action: str
    dtype: str  # output dtype code
    src: TensorInfo  # the instruct tensor
    # graft inputs: (tuned, base) for a full delta, (delta,) for a stored one
    deltas: tuple[TensorInfo, ...] = ()
    lora: LoraTerm | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    @property
    def nbytes(self) -> int:
        return self.src.numel * DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True)
class Shard:
    file: str
    items: tuple[Item, ...]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


@dataclass(frozen=True)
class Plan:
    shards: tuple[Shard, ...]
    alpha: float
    scope: str
    warnings: tuple[str, ...] = ()  # something the user may not expect (ignored tensors)
    notes: tuple[str, ...] = ()  # what the selection implies (tensors left at instruct's values)

    @property
    def items(self) -> list[Item]:
        return [i for s in self.shards for i in s.items]

    @property
    def grafted(self) -> list[str]:
        return [i.name for i in self.items if i.action == "graft"]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def count(self, action: str) -> int:
        return sum(1 for i in self.items if i.action == action)


def select(ck: Checkpoint, *, scope: str = "linear", include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Callable[[str], bool]:
    """The tensor-name predicate for ``scope`` narrowed by ``include`` and ``exclude`` regexes.

    A name is selected when it is in scope, matches at least one include (if
    any are given) and matches no exclude.
    """
    if scope not in SCOPES:
        raise ShadowgraftError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")

    def pick(name: str) -> bool:
        t = ck.tensors[name]
        sib = sibling_weight(name)
        wshape = ck.tensors[sib].shape if sib and sib in ck.tensors else None
        if not in_scope(name, t.shape, scope, wshape):
            return False
        if scope == "all" and not t.is_float:
            return False
        if inc and not any(r.search(name) for r in inc):
            return False
        return not any(r.search(name) for r in exc)

    return pick


def _compile(patterns: Iterable[str], flag: str) -> list[re.Pattern]:
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
    tuned: Checkpoint | None = None,
    delta: Checkpoint | None = None,
    alpha: float = 1.0,
    scope: str = "linear",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str | None = None,
    max_shard_size: int | None = None,
) -> Plan:
    """Plan ``instruct + alpha * (tuned - base)`` (or ``+ alpha * delta``)."""
    if (base is None) != (tuned is None) or (delta is not None) == (tuned is not None):
        raise ShadowgraftError("give either --base and --tuned, or --delta")
    pick = select(instruct, scope=scope, include=include, exclude=exclude)
    sources = {"base": base, "tuned": tuned} if delta is None else {"delta": delta}
    chosen = [n for n in instruct.tensors if pick(n)]
    _check_inputs(instruct, sources, chosen)
    # The engine computes deltas[0] - deltas[1], or adds deltas[0] alone.
    deltas = {n: (tuned[n], base[n]) if delta is None else (delta[n],) for n in chosen}
    items = [_item(t, dtype, deltas.get(t.name)) for t in instruct]
    warnings = _unused_warnings(instruct, sources)
    first = next(iter(sources.values()))
    picked = set(chosen)
    kept = [n for n in instruct.tensors if n in first.tensors and n not in picked]
    notes = [f"{len(kept)} tensor(s) outside --scope {scope}/--include/--exclude keep instruct's values: {_names(kept)}"] if kept else []
    return Plan(tuple(plan_shards(instruct, items, max_shard_size)), alpha, scope, tuple(warnings), tuple(notes))


def _item(src: TensorInfo, dtype: str | None, deltas: tuple[TensorInfo, ...] | None, lora: LoraTerm | None = None) -> Item:
    out = dtype if dtype and src.is_float else src.dtype
    if deltas or lora:
        return Item(src.name, "graft", out, src, deltas or (), lora)
    return Item(src.name, "copy" if out == src.dtype else "cast", out, src)


def items_with(instruct: Checkpoint, dtype: str | None, lora: dict[str, LoraTerm]) -> list[Item]:
    """Items for an adapter graft: tensors in ``lora`` get their low-rank term, the rest copy."""
    return [_item(t, dtype, None, lora.get(t.name)) for t in instruct]


def _check_inputs(instruct: Checkpoint, sources: dict[str, Checkpoint], chosen: list[str]) -> None:
    missing: dict[str, list[str]] = {}
    problems = []
    for n in chosen:
        t = instruct[n]
        if not t.is_float:
            problems.append(f"'{n}' is {t.dtype} in instruct, which cannot be grafted")
            continue
        for label, ck in sources.items():
            if n not in ck:
                missing.setdefault(label, []).append(n)
            elif ck[n].shape != t.shape:
                problems.append(f"'{n}': instruct {tuple(t.shape)} != {label} {tuple(ck[n].shape)}")
            elif not ck[n].is_float:
                problems.append(f"'{n}' is {ck[n].dtype} in {label}, which cannot be grafted")
    for label, names in missing.items():
        problems.insert(0, f"{len(names)} tensor(s) missing from {label} ({sources[label].source}): {_names(names)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShadowgraftError("; ".join(problems[:3]) + more + "; exclude them with --exclude REGEX or fix the inputs")


def _unused_warnings(instruct: Checkpoint, sources: dict[str, Checkpoint]) -> list[str]:
    out = []
    for label, ck in sources.items():
        extra = [n for n in ck.tensors if n not in instruct.tensors]
        if extra:
            out.append(f"{len(extra)} tensor(s) only in {label} are ignored: {_names(extra)}")
    return out


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def parse_size(text: str | int | None) -> int | None:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000; None or ``"auto"`` -> None."""
    if text is None or isinstance(text, int):
        return text
    if text.strip().lower() == "auto":
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ShadowgraftError(f"size '{text}' not understood; use e.g. 5GB, 500MB or 2GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def plan_shards(instruct: Checkpoint, items: list[Item], max_shard_size: int | None) -> list[Shard]:
    """Group items into output files.

    With no size limit the output mirrors instruct's files (same names, same
    tensors per file), which is what users of the instruct model expect.
    Otherwise items are packed greedily in instruct's order and named the
    Hugging Face way. Inside a file, wider dtypes come first so every tensor
    stays aligned to its element size (safetensors does the same).
    """
    groups: list[list[Item]] = []
    if max_shard_size is None:
        by_file: dict = {}
        for it in items:
            by_file.setdefault(it.src.file, []).append(it)
        groups = list(by_file.values())
        names = [f.name for f in by_file] if len(by_file) > 1 else ["model.safetensors"]
    else:
        if max_shard_size <= 0:
            raise ShadowgraftError("--max-shard-size must be positive")
        size = 0
        for it in items:
            if not groups or (size + it.nbytes > max_shard_size and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(it)
            size += it.nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    if not groups:
        groups, names = [[]], ["model.safetensors"]
    return [Shard(name, tuple(sorted(g, key=lambda i: -DTYPE_BITS[i.dtype]))) for name, g in zip(names, groups)]
