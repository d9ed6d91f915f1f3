"""Output files: which tensors go in which shard, in which order, under which name.

With no size limit an output mirrors instruct's files; with one, tensors are
packed greedily and named the Hugging Face way. ``pack`` is the one packing
rule for grafts, training saves and synthetic test models.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from . import fp8
from .errors import ShadowgraftError
from .files import SINGLE_NAME
from .header import DTYPE_BITS


class Shard(NamedTuple):
    """One output file: its name and its tensors (``plan.Item``) in write order."""

    file: str
    items: tuple

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


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


def pack(sizes: Iterable[tuple[object, int]], max_bytes: int | None) -> list[tuple[str, list]]:
    """Pack ``(key, nbytes)`` greedily, in order, into files of at most ``max_bytes`` (one file when None).

    The one shard-packing rule (grafts, training saves, synthetic test
    models): files are named the Hugging Face way, ``model.safetensors`` or
    ``model-0000k-of-0000n.safetensors``. A tensor larger than the limit
    gets a file of its own.

    >>> pack([("a", 3), ("b", 3), ("c", 3)], 6)
    [('model-00001-of-00002.safetensors', ['a', 'b']), ('model-00002-of-00002.safetensors', ['c'])]
    """
    groups: list[list] = [[]]
    size = 0
    for key, nbytes in sizes:
        if max_bytes is not None and groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    n = len(groups)
    names = [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    return list(zip(names, groups))


def aligned(name: str, items: Iterable) -> Shard:
    """A shard of ``items`` with wider dtypes first, so every tensor stays aligned to its element size (as safetensors does)."""
    return Shard(name, tuple(sorted(items, key=lambda i: -DTYPE_BITS[i.dtype])))


def plan_shards(instruct, items: list, max_shard_size: int | None) -> list[Shard]:
    """Group items into output files.

    With no size limit the output mirrors instruct's files (same names, same
    tensors per file), which is what users of the instruct model expect.
    Otherwise items are packed greedily in instruct's order (``pack``).

    The rewritten scales of a requantized FP8 graft go in their weight's file
    (the engine patches them in once the weight is done): F32 sorts before
    F8_E4M3, so they always precede it there.
    """
    owner = {dict(i.fp8)[i.src].name: i for i in items if i.action == "graft" and i.dtype == fp8.CODE}
    scale_items = [i for i in items if i.action == "scale"]
    items = [i for i in items if i.action != "scale"]
    if max_shard_size is None:
        by_file: dict = {}
        for it in items:
            by_file.setdefault(it.src.file, []).append(it)
        for it in scale_items:
            by_file.setdefault(owner[it.name].src.file, []).append(it)
        if len(by_file) <= 1:
            return [aligned(SINGLE_NAME, items + scale_items)]
        return [aligned(f.name, g) for f, g in by_file.items()]
    if max_shard_size <= 0:
        raise ShadowgraftError("--max-shard-size must be positive")
    groups = pack(((it, it.nbytes) for it in items), max_shard_size)
    # A few bytes past the limit rather than a scale apart from its weight.
    home = {id(it): g for _, g in groups for it in g}
    for it in scale_items:
        home[id(owner[it.name])].append(it)
    return [aligned(name, g) for name, g in groups]
