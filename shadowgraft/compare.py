"""``shadowgraft.stats``: how far apart two checkpoints are, per tensor, layer and module.

Tensors are streamed through the same reader as ``apply`` (pread into reused
buffers, fp32 chunks, float64 sums), so memory stays flat whatever the model
size. The headline number, ``summary.sigma_mean``, is the Shadow-FT paper's:
the unweighted mean of sigma over the tensors inside transformer blocks.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import fp8, native
from .checkpoint import Checkpoint
from .dtypes import torch_dtype
from .errors import ShadowgraftError
from .fileio import truncated
from .header import DTYPE_BITS, TensorInfo
from .metrics import DeltaSums, Sums, from_parts, kernel, new_parts, range_sums, scratch_elements
from .naming import block_index, family, module_kind, tower
from .plan import select
from .prefix import Rename, find
from .report import Mismatch, Report, TensorRow
from .stages import default_workers
from .stream import Reader
from .summary import CLOSE, THRESHOLD, group_rows, summarize

# 256K elements: the fp32 rows [A | B | A-B | scratch] of a chunk (4 MB) stay
# in cache between the passes over it, which is what makes several passes
# cheap; larger chunks measured no faster.
STATS_CHUNK = 1 << 18
# Chunks per task: 1M elements per pread, 2 MB per bf16 input.
SPAN_STEPS = 4
# Chunks per task where the compiled kernel reads the files itself: its
# buffers are a fixed 3 MB whatever the span, so spans can be long and the
# Python per task rare (measured 13.0 / 16.0 / 16.4 GB/s at 4 / 16 / 64
# chunks against 27 GB/s for reading alone, 2-core AMD EPYC, warm cache).
NATIVE_SPAN_STEPS = 16



@dataclass(frozen=True)
class _Pair:
    """One tensor to compare: the first ``numel`` elements of ``a`` and ``b`` (and ``tuned``)."""

    name: str
    a: TensorInfo
    b: TensorInfo
    shape: tuple[int, ...]  # of the compared part
    tuned: TensorInfo | None = None
    scales: tuple[TensorInfo | None, ...] = (None, None, None)  # of a, b, tuned when FP8: read dequantized

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def stats(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    tuned: str | os.PathLike | None = None,
    scope: str = "all",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    threshold: float = THRESHOLD,
    close: float | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    chunk: int = STATS_CHUNK,
    workers: int | None = None,
) -> Report:
    """Compare checkpoint ``a`` (base) with ``b`` (instruct); with ``tuned``, also compare T-A with B-A.

    ``progress(nbytes)`` is called after each chunk; ``on_start(total_bytes)``
    once before reading. ``chunk`` (elements) and ``workers`` (threads,
    default ``stages.default_workers()``, one per usable CPU) only change
    speed, not results.

    >>> r = shadowgraft.stats("Qwen/Qwen3-4B-Base", "Qwen/Qwen3-4B-Instruct-2507")  # doctest: +SKIP
    >>> round(r.summary.sigma_mean, 4)                                              # doctest: +SKIP
    0.0562
    """
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ShadowgraftError(f"--threshold must be a positive number, got {threshold}")
    close = min(CLOSE, threshold) if close is None else close
    if not (0 < close <= threshold and math.isfinite(close)):
        raise ShadowgraftError(f"--close must be a positive number no larger than --threshold ({threshold}), got {close}")
    if chunk < 1:
        raise ShadowgraftError(f"chunk must be at least 1 element, got {chunk}")
    with ExitStack() as stack:
        cka = stack.enter_context(Checkpoint.open(a))
        ckb = stack.enter_context(Checkpoint.open(b))
        ckt = stack.enter_context(Checkpoint.open(tuned)) if tuned is not None else None
        m = _match(cka, ckb, ckt, scope=scope, include=include, exclude=exclude)
        if not m.pairs:
            raise ShadowgraftError(
                f"{cka.source} and {ckb.source} have no floating tensor of the same name in common"
                + (" inside --scope/--include/--exclude" if scope != "all" or include or exclude else "")
                + "; check that both are the same architecture"
            )
        reader = Reader([c for c in (cka, ckb, ckt) if c is not None], chunk=chunk)
        total = sum(_pair_bytes(p) for p in m.pairs)
        if on_start is not None:
            on_start(total)
        t0 = time.perf_counter()
        measured = _measure(m.pairs, reader, progress or (lambda n: None), workers or default_workers())
        seconds = time.perf_counter() - t0
    rows = [_row(p, s, d) for p, (s, d) in zip(m.pairs, measured)]
    return Report(
        a=cka.source, b=ckb.source, tuned=ckt.source if ckt is not None else None,
        summary=summarize(rows, threshold=threshold, close=close, tuned=ckt is not None),
        tensors=rows, layers=group_rows(rows, by="layer"), modules=group_rows(rows, by="module"),
        only_in_a=m.only_a, only_in_b=m.only_b, mismatched=m.mismatched, skipped=m.skipped,
        tuned_missing=m.tuned_missing, seconds=seconds, bytes_read=total,
        renamed={k: r.to_dict() for k, r in m.renamed.items()}, fp8_scales=m.fp8_scales,
    )


# -- which tensors to compare ---------------------------------------------


@dataclass(frozen=True)
class _Matched:
    pairs: list[_Pair]
    only_a: list[str]
    only_b: list[str]
    mismatched: list[Mismatch]
    skipped: list[str]  # in both, but not F64/F32/F16/BF16 in both
    tuned_missing: list[str]  # compared A/B pairs that T lacks or has in another shape (towers T has)
    renamed: dict[str, Rename]  # "a", "b" or "tuned" -> the prefix rule its names were compared under
    fp8_scales: list[str]  # weight_scale_inv tensors of A or B, compared through their weights


def _match(cka: Checkpoint, ckb: Checkpoint, ckt: Checkpoint | None, *, scope: str, include: Sequence[str],
           exclude: Sequence[str]) -> _Matched:
    va, vb, vt, renamed = _views(cka, ckb, ckt)
    pick_a = select(va, scope=scope, include=include, exclude=exclude)
    # A tensor only one side has is listed whatever its dtype (an int64
    # position_ids counts as much as a weight when asking what differs).
    listed_a = select(va, scope=scope, include=include, exclude=exclude, floats_only=False)
    listed_b = select(vb, scope=scope, include=include, exclude=exclude, floats_only=False)
    named = _name_filter(include, exclude)
    qa, qb = fp8.scales(va), fp8.scales(vb)
    qt = fp8.scales(vt) if vt is not None else {}
    scale_names = {fp8.scale_name(w) for q in (qa, qb) for w in q}
    pairs, only_a, mismatched, skipped, tuned_missing = [], [], [], [], []
    for name, ta in va.tensors.items():
        tb = vb.tensors.get(name)
        if name in scale_names:
            continue
        if tb is None:
            if listed_a(name):
                only_a.append(name)
            continue
        if not (ta.is_float or name in qa) or not (tb.is_float or name in qb):
            # Integer buffers (position ids, masks) are not compared (FP8 scales were set aside above).
            if named(name):
                skipped.append(name)
            continue
        if not pick_a(name):
            continue
        shape = _overlap(ta.shape, tb.shape)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            how = "all" if ta.shape == tb.shape else (f"first {shape[0]} rows" if shape is not None else "none")
            mismatched.append(Mismatch(name, ta.shape, tb.shape, ta.dtype, tb.dtype, how))
        if shape is None:
            continue
        tt = None
        if vt is not None:
            cand = vt.tensors.get(name)
            if cand is not None and (cand.is_float or name in qt) and cand.shape == ta.shape == tb.shape:
                tt = cand
            elif tower(name) in vt.towers:
                tuned_missing.append(name)
        pairs.append(_Pair(name, ta, tb, shape, tt, (qa.get(name), qb.get(name), qt.get(name) if tt is not None else None)))
    only_b = [n for n in vb.tensors if n not in va.tensors and listed_b(n)]
    return _Matched(pairs, only_a, only_b, mismatched, skipped, tuned_missing, renamed,
                    sorted(n for n in scale_names if named(n)))


@dataclass(frozen=True)
class _View:
    """A checkpoint's tensors under the names they are compared by (what ``select`` reads)."""

    tensors: dict[str, TensorInfo]
    source: str
    root: Path | None = None  # where config.json is: it may say the checkpoint is quantized

    @property
    def towers(self) -> set[str]:
        return {tower(n) for n in self.tensors}


def _views(cka: Checkpoint, ckb: Checkpoint, ckt: Checkpoint | None) -> tuple[_View, _View, _View | None, dict[str, Rename]]:
    """A, B and tuned under one naming: a text-only side takes the multimodal side's names (``prefix.find``)."""
    a, b = set(cka.tensors), set(ckb.tensors)
    renamed: dict[str, Rename] = {}
    if not (a <= b or b <= a):
        # Whichever side pairs completely into the other is the text-only one.
        errors = []
        for label, src, dst in (("a", cka, ckb), ("b", ckb, cka)):
            try:
                rule = find(src.tensors, dst.tensors, what=src.source, onto=dst.source)
            except ShadowgraftError as e:
                errors.append(e)
                continue
            if rule is not None:
                renamed[label] = rule
                break
        else:
            if len(errors) == 2:
                raise errors[0]
    va = _View({renamed["a"](n) if "a" in renamed else n: t for n, t in cka.tensors.items()}, cka.source, cka.root)
    vb = _View({renamed["b"](n) if "b" in renamed else n: t for n, t in ckb.tensors.items()}, ckb.source, ckb.root)
    vt = None
    if ckt is not None:
        rule = find(ckt.tensors, va.tensors, what=ckt.source, onto=cka.source)
        if rule is not None:
            renamed["tuned"] = rule
        vt = _View({rule(n) if rule else n: t for n, t in ckt.tensors.items()}, ckt.source, ckt.root)
    return va, vb, vt, renamed


def _name_filter(include: Sequence[str], exclude: Sequence[str]) -> Callable[[str], bool]:
    # The patterns were already validated by ``select``.
    inc, exc = [re.compile(p) for p in include], [re.compile(p) for p in exclude]
    return lambda n: (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)


def _overlap(sa: tuple[int, ...], sb: tuple[int, ...]) -> tuple[int, ...] | None:
    """The comparable part: the whole tensor, or the shared first rows of a resized one (e.g. a vocabulary)."""
    if sa == sb:
        return sa
    if len(sa) == len(sb) and len(sa) >= 1 and sa[1:] == sb[1:]:
        return (min(sa[0], sb[0]), *sa[1:])
    return None


def _pair_bytes(p: _Pair) -> int:
    return p.numel * _bytes_per_element(p)


def _bytes_per_element(p: _Pair) -> int:
    return sum(DTYPE_BITS[i.dtype] // 8 for i in _infos(p))


def _infos(p: _Pair) -> list[TensorInfo]:
    return [i for i in (p.a, p.b, p.tuned) if i is not None]


# -- streaming --------------------------------------------------------------


def _measure(pairs: list[_Pair], reader: Reader, progress: Callable[[int], None],
             workers: int) -> list[tuple[Sums, DeltaSums | None]]:
    """Sums of every pair, span by span; spans run on ``workers`` threads, results are added in order."""
    import torch

    for p in pairs:
        # Open every file now: workers must not race to open (and leak) descriptors.
        for info in (p.a, p.b, p.tuned, *p.scales):
            if info is not None:
                reader.fd(info)
    kernel()  # compile it once, here, before the workers race to
    totals = [(Sums(), DeltaSums() if p.tuned is not None else None) for p in pairs]
    slot = threading.local()
    ids = itertools.count()
    # One task reads a span of SPAN_STEPS chunks with one pread per input and
    # sums it chunk by chunk: few, large reads and little Python per byte.
    span = reader.chunk * SPAN_STEPS
    direct = [not any(p.scales) and native.reads(*(torch_dtype(i.dtype) for i in _infos(p))) for p in pairs]

    def tasks():
        # A generator: a 70B model is ~75K spans, no need to list them.
        for k, p in enumerate(pairs):
            # FP8 weights are read a 128-row band at a time, with that band's scales.
            step = fp8.band(p.shape) if any(p.scales) else reader.chunk * NATIVE_SPAN_STEPS if direct[k] else span
            for s in range(0, p.numel, step):
                yield k, s, min(step, p.numel - s)

    def work(k: int, s: int, n: int) -> tuple[Sums, DeltaSums | None]:
        # Each thread owns its buffers, named by a per-thread role suffix.
        if not hasattr(slot, "id"):
            slot.id = next(ids)
        r, p = slot.id, pairs[k]
        if direct[k]:
            return _read_sums(reader, r, p, s, n)
        a, b = _load(reader, f"a{r}", p.a, p.scales[0], s, n), _load(reader, f"b{r}", p.b, p.scales[1], s, n)
        t = _load(reader, f"t{r}", p.tuned, p.scales[2], s, n) if p.tuned is not None else None
        w = reader.work(f"w{r}", scratch_elements(n, reader.chunk), torch.float32)
        return range_sums(a, b, tuned=t, work=w, step=reader.chunk)

    def advise(k: int, s: int) -> None:
        if s == 0 and k + 1 < len(pairs):
            # Let the kernel read the next tensors while this one is computed.
            nxt = pairs[k + 1]
            reader.advise(nxt.a, nxt.b, *((nxt.tuned,) if nxt.tuned is not None else ()))

    def collect(task: tuple[int, int, int], res: tuple[Sums, DeltaSums | None]) -> None:
        k, _, n = task
        s, d = totals[k]
        part, dpart = res
        totals[k] = (s + part, d + dpart if d is not None else None)
        progress(n * _bytes_per_element(pairs[k]))

    with _torch_threads(1):
        # One thread per op: torch's own per-op threading syncs every few
        # microseconds on these chunk-sized ops, which stalls badly whenever
        # the cores are shared; parallel chunks scale instead.
        if workers <= 1:
            for task in tasks():
                advise(*task[:2])
                collect(task, work(*task))
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="stats") as ex:
                pending: deque = deque()
                for task in tasks():
                    advise(*task[:2])
                    pending.append((task, ex.submit(work, *task)))
                    if len(pending) > 2 * workers:
                        collect(*_result(pending.popleft()))
                while pending:
                    collect(*_result(pending.popleft()))
    return totals


def _read_sums(reader: Reader, r: int, p: _Pair, s: int, n: int):
    """The compiled kernel reads elements ``[s, s+n)`` of each input itself, a cache-sized piece at a time."""
    infos = _infos(p)
    parts = new_parts(n, reader.chunk)
    buf = reader.raw(f"n{r}", native.scratch_bytes())
    inputs = [(reader.fd(i), i.start + s * (DTYPE_BITS[i.dtype] // 8), torch_dtype(i.dtype)) for i in infos]
    failed = native.sums_files(inputs, n, reader.chunk, parts, buf)
    if failed is not None:
        info, err = infos[failed[0]], failed[1]
        if err < 0:
            raise truncated(info)
        raise OSError(err, os.strerror(err), str(info.file))
    # Only NaN or Inf sums need the values again (to count them): read them the ordinary way.
    return from_parts(parts, n, reader.chunk, tuned=p.tuned is not None,
                      values=lambda: (reader.load(f"a{r}", p.a, s, n), reader.load(f"b{r}", p.b, s, n)))


def _load(reader: Reader, role: str, info: TensorInfo, scale: TensorInfo | None, s: int, n: int):
    """Elements ``[s, s+n)`` as stored, or an FP8 weight's dequantized to fp32 (the exact product rounded once)."""
    if scale is None:
        return reader.load(role, info, s, n)
    import torch

    return reader.load_value(role, info, s, n, torch.float32, scale)


def _result(item):
    task, fut = item
    return task, fut.result()


@contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _row(p: _Pair, s: Sums, d: DeltaSums | None) -> TensorRow:
    kind = module_kind(p.name)
    dtype = p.a.dtype if p.a.dtype == p.b.dtype else f"{p.a.dtype}/{p.b.dtype}"
    return TensorRow(name=p.name, shape=p.shape, dtype=dtype, layer=block_index(p.name), module=kind,
                     family=family(kind), partial=p.shape != p.a.shape or p.shape != p.b.shape, sums=s, delta=d,
                     tower=tower(p.name))
