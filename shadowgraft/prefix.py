"""Match two checkpoints whose tensor names differ only by a prefix.

A language model fine-tuned text-only (the multimodal base's language model
loaded as a CausalLM) is saved as ``model.layers.N...`` while the multimodal
base and instruct say ``language_model.model.layers.N...`` (transformers 4
layout, LLaVA, Gemma 3) or ``model.language_model.layers.N...`` (the
transformers 5 layout, with ``lm_head`` left at the top). One rule covers
both: names that start with ``old`` get ``new`` instead, the others stay as
they are, where ``old`` and ``new`` differ by whole wrapper components
added, dropped or reordered (``_plausible``). ``find`` looks for the one rule under which every source name has
a partner. Pure functions over name sets; no file is read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable

from .errors import ShadowgraftError
from .naming import block_index


@dataclass(frozen=True)
class Rename:
    """Names starting with ``old`` start with ``new`` instead; other names are unchanged.

    >>> Rename("", "language_model.")("model.layers.0.mlp.up_proj.weight")
    'language_model.model.layers.0.mlp.up_proj.weight'
    """

    old: str
    new: str

    def __call__(self, name: str) -> str:
        return self.new + name[len(self.old):] if name.startswith(self.old) else name

    def __str__(self) -> str:
        return f"'{self.old}' -> '{self.new}'"

    def to_dict(self) -> dict[str, str]:
        return {"from": self.old, "to": self.new}


def _splits(name: str) -> Iterable[tuple[str, str]]:
    """``(head, tail)`` at every component boundary; head is '' or ends with '.'."""
    yield "", name
    for i, c in enumerate(name):
        if c == ".":
            yield name[: i + 1], name[i + 1:]


def candidates(source: Collection[str], target: Collection[str]) -> list[Rename]:
    """Every rule that maps at least one source name missing from ``target`` onto a target name.

    Any rule that pairs every source name must pair the first unmatched one,
    so its splits against the target names that share its tail are all the
    rules there can be.
    """
    tgt = set(target)
    first = next((n for n in sorted(source) if n not in tgt), None)
    if first is None:
        return []
    by_tail: dict[str, list[str]] = {}
    for n in tgt:
        for head, tail in _splits(n):
            by_tail.setdefault(tail, []).append(head)
    out = []
    for old, tail in _splits(first):
        for new in by_tail.get(tail, ()):
            if new != old and _plausible(old, new):
                out.append(Rename(old, new))
    return out


def _plausible(old: str, new: str) -> bool:
    """A rule adds, drops or reorders whole components (wrapper models' names), never rewrites one or moves a block.

    ``model.`` -> ``model.language_model.``, ``transformer.`` -> ``''`` and
    ``model.language_model.`` -> ``language_model.model.`` are what
    transformers does; ``x.`` -> ``model.`` or ``layers.7.`` ->
    ``layers.1.`` would pair unrelated tensors.
    """
    if sorted(old.split(".")) == sorted(new.split(".")):
        # The same wrappers in another order: a PEFT adapter trained on the
        # multimodal model as transformers 5 holds it (model.language_model.)
        # against the files' language_model.model.
        return True
    short, long = sorted((old, new), key=len)
    return long.startswith(short) and block_index("." + long[len(short):]) is None


def coverage(rule: Rename, source: Collection[str], target: Collection[str]) -> list[str]:
    """Source names the rule leaves without a partner (or maps onto a partner already taken)."""
    tgt, seen, bad = set(target), set(), []
    for n in sorted(source):
        m = rule(n)
        if m not in tgt or m in seen:
            bad.append(n)
        seen.add(m)
    return bad


def find(source: Collection[str], target: Collection[str], *, what: str = "tuned", onto: str = "instruct") -> Rename | None:
    """The one rule under which every ``source`` name has a partner in ``target``; None when the names already match.

    None too when no rule pairs more names than the names as they are (the
    caller's own checks then say what is missing). An ambiguous rule, or a
    best rule that still leaves names unpaired, is refused naming them.

    >>> find(["model.layers.0.q.weight", "lm_head.weight"],
    ...      ["model.language_model.layers.0.q.weight", "lm_head.weight", "model.visual.blocks.0.q.weight"])
    Rename(old='model.', new='model.language_model.')
    """
    tgt = set(target)
    src = sorted(set(source))
    if all(n in tgt for n in src):
        return None
    identity = sum(1 for n in src if n in tgt)
    # A tail as common as "weight" yields a candidate per target tensor (90K
    # for DeepSeek-V3): screen each on a spread sample of the unpaired names
    # first, which a rule renaming one module fails at once.
    unpaired = [n for n in src if n not in tgt]
    sample = unpaired[:: max(1, len(unpaired) // 64)]
    scored: dict[tuple[str, ...], tuple[Rename, list[str]]] = {}
    for rule in candidates(src, tgt):
        if 2 * sum(1 for n in sample if rule(n) in tgt) < len(sample):
            continue
        image = tuple(rule(n) for n in src)
        # Rules with the same effect on these names (model.->lm.model. and ''->lm.) are one mapping: keep the shortest.
        if image not in scored or len(rule.old) < len(scored[image][0].old):
            scored[image] = (rule, coverage(rule, src, tgt))
    full = sorted((r for r, bad in scored.values() if not bad), key=lambda r: (len(r.old), r.old, r.new))
    if len(full) == 1:
        return full[0]
    if len(full) > 1:
        raise ShadowgraftError(
            f"{what}'s tensor names match {onto}'s under several prefix changes ({', '.join(map(str, full[:3]))}); "
            f"the pairing is ambiguous: select the tower to graft with --include, or rename {what}'s tensors")
    best = max(scored.values(), key=lambda rb: (len(src) - len(rb[1]), -len(rb[0].old)), default=None)
    if best is None or len(src) - len(best[1]) <= identity:
        return None
    rule, bad = best
    raise ShadowgraftError(
        f"{what}'s tensor names match {onto}'s only in part under prefix change {rule}: {len(bad)} of {len(src)} {what} "
        f"tensor(s) have no partner: {_names(bad)}; check that both are the same architecture")


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")
