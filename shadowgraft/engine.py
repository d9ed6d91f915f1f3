"""Execute a plan: stream every output tensor to disk in bounded fp32 chunks.

Memory stays flat whatever the model size: inputs are read with ``pread``
into a few reused chunk buffers (no mmap pages pile up in RSS), each chunk
is upcast into reused work buffers, combined in place, rounded once to the
output dtype and written straight to the shard. Untouched tensors never
enter Python: their byte ranges are copied by the kernel.

Reading, computing and writing overlap on their own threads (``stages.py``,
which also starts helper compute workers where computing binds); this
module says what each stage does to a chunk. The GIL is released in every
syscall and torch kernel, the common graft runs in the compiled kernel
(``native.py``) or as one TorchScript call (``fused.py``), so the stages
really run at once; on CUDA one compute stage uploads from pinned buffers
and downloads into pinned buffers, and the writer waits on an event before
writing.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import fp8, fused, heap, native, stages
from .checkpoint import Checkpoint
from .dtypes import torch_dtype
from .fileio import copy_range, preallocate, pwrite_all, write_all
from .header import DTYPE_BITS, TensorInfo
from .lora_rows import LoraRows
from .mix import combine, dare_keep, kth_largest
from .plan import Item
from .shards import Shard
from .stages import default_workers
from .stream import CHUNK, Reader
from .writer import shard_header

# Chunks of this many times the chunk size where the compiled kernel computes
# (one pass, so its data need not stay in cache between torch ops): fewer
# hand-offs between the stages. A 3.2 GB bf16 graft on the 2-core AMD
# machine took 0.405 / 0.338 / 0.315 / 0.373 s at 1 / 2 / 4 / 8 times 256K
# elements; the torch ops of the general path got slower with larger chunks.
NATIVE_CHUNKS = 4


@dataclass
class Stats:
    """What a run did for one output, for the summary table and its ``shadowgraft.json``."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    grafted: int = 0
    copied: int = 0
    cast: int = 0
    # NaN and Inf in the written values, per tensor: bad inputs, and overflow
    # when rounding to a narrower dtype (fp16's 65504) alike.
    nonfinite: dict[str, int] = field(default_factory=dict)


@dataclass
class _Op:
    """One unit of pipeline work: a kernel copy of a byte run, or one chunk of one tensor."""

    kind: str  # "copy" | "chunk" | "hole" (room for scales written later)
    items: tuple[Item, ...] = ()  # chunk: the same tensor in each output
    first: TensorInfo | None = None  # copy: where the run starts
    nbytes: int = 0  # copy: run length
    start: int = 0  # chunk: first element
    n: int = 0  # chunk: element count
    last: bool = False  # chunk: last chunk of its tensor
    inputs: dict[tuple, torch.Tensor] | None = None  # keyed by where the input lives (file, offset)
    outs: list[torch.Tensor] = field(default_factory=list)
    slot: int = 0
    event: object = None
    seq: int = 0  # position in the output files: the writer writes in this order
    bad: list = field(default_factory=list)  # chunk: NaN/Inf written, per output (int or a CUDA scalar)


def _key(info: TensorInfo) -> tuple:
    return (info.file, info.start)


def wants_float64(it: Item) -> bool:
    """fp32 has twice the mantissa of a 16-bit input, so one final rounding is (almost
    always) the correctly rounded result; fp32 inputs need fp64 for the same guarantee,
    and so do FP8 weights, whose dequantized values are exact in fp64 only."""
    wide = {"F32", "F64"}
    if it.fp8 or it.dtype == fp8.CODE:
        return True
    if it.action == "graft" and it.terms and it.base is None:
        # A stored delta (``diff``) already holds the working precision of the
        # graft it came from, F32 for 16-bit models and F64 for F32 ones, so
        # only F64 says the model was F32; this keeps diff + apply --delta
        # byte-identical to apply --base --tuned.
        return bool({it.src.dtype, it.dtype} & wide) or any(t.dtype == "F64" for t in it.terms)
    return bool({i.dtype for i in it.inputs} & wide or it.dtype in wide)


class Engine:
    """Runs shards of a plan against open checkpoints. One instance per run.

    ``stats`` counts what the run read; each output's own counters (tensors
    written, NaN/Inf) go to the ``Stats`` given with its shard, so one
    output's bad values are never recorded in another's.
    """

    def __init__(self, checkpoints: list[Checkpoint], *, device: str = "cpu", chunk: int = CHUNK,
                 progress: Callable[[int], None] | None = None, workers: int | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.reader = Reader(checkpoints, device=self.device, chunk=chunk, pinned=self.cuda)
        self.chunk = chunk
        self.progress = progress or (lambda n: None)
        self.stats = Stats()
        self._outs: list[Stats] = [self.stats]
        self._lora = LoraRows(self.reader, self.device)
        self._thresholds: dict[tuple, float] = {}  # TIES: (item inputs, term) -> k-th largest |d| of the tensor
        # Requantized FP8 grafts: (output, scale name) -> the new scales, filled
        # band by band by the compute stage and written by the writer stage
        # at the scale tensor's offset, _holes[output][name], once complete.
        self._qscales: dict[tuple[int, str], torch.Tensor] = {}
        self._holes: list[dict[str, int]] = []
        self._local = threading.local()  # per compute worker: ``_bad``
        self._tensor_bad: list = []  # NaN/Inf of the tensor being written, per output (writer thread)
        self.workers = workers  # compute workers; None: default_workers()
        self._cost = [0.0, 0.0, 0.0]  # CPU seconds spent reading, computing, writing, over every shard so far
        if self.cuda:
            self._stream = torch.cuda.Stream(self.device)

    # -- planning the op stream ---------------------------------------------

    def _ops(self, shards: list[Shard]) -> Iterator[_Op]:
        items = shards[0].items
        k = 0
        while k < len(items):
            it = items[k]
            group = tuple(s.items[k] for s in shards)
            if it.action == "copy":
                # Merge runs of byte-adjacent copies into one kernel call.
                j = k + 1
                while (j < len(items) and items[j].action == "copy" and items[j].src.file == it.src.file
                       and items[j].src.start == items[j - 1].src.end):
                    j += 1
                for st in self._outs:
                    st.copied += j - k
                yield _Op("copy", first=it.src, nbytes=items[j - 1].src.end - it.src.start)
                k = j
                continue
            if it.action == "scale":
                yield _Op("hole", items=group, nbytes=it.nbytes)
                k += 1
                continue
            step = self._step(it)
            n = it.src.numel
            for s in range(0, n, step):
                yield _Op("chunk", items=group, start=s, n=min(step, n - s), last=s + step >= n)
            if n == 0:
                yield _Op("chunk", items=group, start=0, n=0, last=True)
            k += 1

    def _step(self, it: Item) -> int:
        if it.fp8 or it.dtype == fp8.CODE:
            # One 128-row band: a block scale depends on its whole block.
            return fp8.band(it.src.shape)
        if it.lora is None:
            return self.chunk * NATIVE_CHUNKS if self._native(it) else self.chunk
        # Low-rank terms are computed a row block at a time.
        cols = max(it.src.shape[-1] if it.src.shape else 1, 1)
        return max(cols, (self.chunk // cols) * cols)

    # -- the three stages -----------------------------------------------------

    def _read(self, op: _Op) -> None:
        """Fill the op's slot with its inputs; a tensor several outputs use (instruct, base, a grid's tuned) is read once."""
        r, slot = self.reader, op.slot
        op.inputs = {}
        for it in op.items:
            for info in it.inputs:
                key = _key(info)
                if key not in op.inputs:
                    op.inputs[key] = r.load(f"in{len(op.inputs)}@{slot}", info, op.start, op.n)
            for info, scale in it.fp8:
                # The scale rows of this band, read with it.
                key = _key(scale)
                if key not in op.inputs:
                    op.inputs[key] = r.load(f"in{len(op.inputs)}@{slot}", scale, *fp8.scale_span(info.shape, op.start, op.n))
        self.stats.bytes_read += sum(x.numel() * x.element_size() for x in op.inputs.values())

    @property
    def _bad(self) -> list:
        """The NaN/Inf counts of the chunk this compute worker is computing, one per output (``op.bad``)."""
        return self._local.bad

    def _compute(self, op: _Op) -> None:
        # Counted per chunk, not per tensor: workers finish chunks out of
        # order, so the writer adds them up in file order (_account).
        self._local.bad = op.bad = [0] * len(op.items)
        changes: dict[tuple, torch.Tensor] = {}  # outputs with the same change compute it once
        op.outs = [self._compute_item(op, j, it, changes) for j, it in enumerate(op.items)]
        if op.last:
            # TIES runs with one compute worker (see _pipeline), so no later
            # tensor's threshold has been computed yet.
            self._thresholds.clear()

    def _compute_item(self, op: _Op, j: int, it: Item, changes: dict) -> torch.Tensor:
        """Output ``j`` of a chunk, by the fastest route that gives the general path's bits."""
        if self._fusable(it):
            return self._fused(op, j, it)
        if self._native_delta(it):
            return self._delta(op, j, it)
        return self._compute_one(op, j, it, changes)

    def _fusable(self, it: Item) -> bool:
        """The plain graft ``fused.py`` computes: one term, no mix, no LoRA, 16/32-bit floats, on the CPU."""
        return (not self.cuda and it.action == "graft" and len(it.terms) == 1 and it.mix is None
                and it.lora is None and not it.fp8 and it.dtype in fused.DTYPES
                and all(i.dtype in fused.DTYPES for i in it.inputs))

    def _native(self, it: Item) -> bool:
        """A chunk the compiled kernel computes (longer chunks suit it)."""
        return self._native_graft(it) or self._native_delta(it)

    def _native_graft(self, it: Item) -> bool:
        """A plain graft ``native.graft`` computes: an fp32 working dtype and a bf16 output."""
        return self._fusable(it) and native.available() and it.dtype == "BF16" and not wants_float64(it)

    def _native_delta(self, it: Item) -> bool:
        """``diff``'s fp32 delta of a 16-bit model (``native.delta``)."""
        return (not self.cuda and native.available() and it.action == "delta" and it.dtype == "F32" and not it.fp8
                and it.lora is None and all(i.dtype in ("BF16", "F16") for i in it.inputs))

    def _delta(self, op: _Op, j: int, it: Item) -> torch.Tensor:
        """``_compute_one`` for a delta in the compiled kernel: the same bits (the exact difference rounded once)."""
        host_out = self.reader.raw(f"out.{j}@{op.slot}", op.n * 4).view(torch.float32)
        self._bad[j] += native.delta(self._in(op, it.base), self._in(op, it.src), host_out)
        return host_out

    def _fused(self, op: _Op, j: int, it: Item) -> torch.Tensor:
        """``_compute_one`` for a plain graft, in the compiled kernel or as one TorchScript call: the same bits."""
        r, m = self.reader, op.n
        host_out = r.raw(f"out.{j}@{op.slot}", m * (DTYPE_BITS[it.dtype] // 8)).view(torch_dtype(it.dtype))
        x, term = self._in(op, it.src), self._in(op, it.terms[0])
        base = self._in(op, it.base) if it.base is not None else None
        if self._native_graft(it):
            bad = native.graft(x, base, term, it.alpha, host_out)
            if bad is not None:  # None: buffers the kernel does not take, left to TorchScript
                self._bad[j] += bad
                return host_out
        wd = torch.float64 if wants_float64(it) else torch.float32
        check = fused.graft_kernel()(x, base, term, float(it.alpha), host_out, r.work("fused", 3 * m, wd).view(3, m),
                                     wd == torch.float32 and it.dtype in ("BF16", "F32"))
        if m and not math.isfinite(float(check)):
            self._bad[j] += int((~torch.isfinite(host_out)).sum())
        return host_out

    def _account(self, op: _Op) -> None:
        """Add a written chunk's NaN/Inf to its tensor's; count the tensor in each output's Stats after its last chunk."""
        for j, bad in enumerate(op.bad):
            # A CUDA count is a device scalar; the writer has waited for its chunk already.
            self._tensor_bad[j] += int(bad)
        if op.last:
            for j, (it, st) in enumerate(zip(op.items, self._outs)):
                if self._tensor_bad[j]:
                    st.nonfinite[it.name] = self._tensor_bad[j]
                if it.action == "cast":
                    st.cast += 1
                else:
                    st.grafted += 1
            self._tensor_bad = [0] * len(op.items)

    def _compute_one(self, op: _Op, j: int, it: Item, changes: dict) -> torch.Tensor:
        r, m = self.reader, op.n
        out_dt, osz = torch_dtype(it.dtype), DTYPE_BITS[it.dtype] // 8
        host_out = r.raw(f"out.{j}@{op.slot}", m * osz).view(out_dt)
        if it.action == "cast" and not it.fp8:
            res = self._in(op, it.src)
        else:
            wd = torch.float64 if wants_float64(it) else torch.float32
            acc = r.work("acc", m, wd)
            self._value(op, it, it.src, acc)
            if it.action == "delta":
                # diff: tuned (src) - base alone, the same subtraction a graft does.
                b = r.work("b", m, wd)
                self._value(op, it, it.base, b)
                acc.sub_(b)
            elif it.terms:
                _add_scaled(acc, self._change(op, it, wd, changes), it.alpha, r.work("scaled", m, wd))
            if it.lora is not None:
                rows = self._lora.rows(it.lora, op.start, m, wd)
                _add_scaled(acc, rows, it.alpha, rows)
            res = acc
        if it.dtype == fp8.CODE:
            return self._requantize(op, j, it, res, host_out)
        if self.cuda:
            dev_out = r.work(f"out.{j}", m, out_dt)
            dev_out.copy_(res)
            # Counted on the device; reading it back each chunk would stall the stream.
            self._bad[j] = self._bad[j] + (~torch.isfinite(dev_out)).sum()
            host_out.copy_(dev_out, non_blocking=True)
            op.event = torch.cuda.Event()
            op.event.record()
        else:
            host_out.copy_(res)
            # Counted on the rounded values, so overflow to Inf counts too. One
            # reduction is far cheaper than isfinite() on every chunk; only a
            # non-finite sum triggers the exact count.
            # fp32 is exact enough: a finite sum that overflows only costs an exact count.
            if m and host_out.is_floating_point() and not math.isfinite(float(host_out.sum(dtype=torch.float32))):
                self._bad[j] += int((~torch.isfinite(host_out)).sum())
        return host_out

    def _in(self, op: _Op, info: TensorInfo) -> torch.Tensor:
        return self._dev(op.inputs[_key(info)])

    def _value(self, op: _Op, it: Item, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
        """``info``'s chunk upcast into ``out``; an FP8 input multiplied by its block scales (exact in float64)."""
        out.copy_(self._in(op, info))
        for x, scale in it.fp8:
            if x == info:
                fp8.dequantize_(out, self._in(op, scale), info.shape[-1], op.start)
        return out

    def _requantize(self, op: _Op, j: int, it: Item, res: torch.Tensor, host_out: torch.Tensor) -> torch.Tensor:
        """Quantize one grafted band back to FP8 and keep its new scale row for the scale tensor."""
        scale_info = dict(it.fp8)[it.src]
        key = (j, scale_info.name)
        # setdefault, one atomic step: two compute workers may start bands of one tensor at once.
        scales = self._qscales.setdefault(key, torch.empty(scale_info.shape, dtype=torch.float32))
        if op.n:
            out = self.reader.work(f"out.{j}", op.n, torch.float8_e4m3fn) if self.cuda else host_out
            row = self.reader.work("qscale", scale_info.shape[-1], torch.float32)
            fp8.quantize_band_(res, it.src.shape[-1], out, row, self.reader.work("q", op.n, torch.float64))
            # Counted before quantizing: a NaN or Inf poisons its whole block's scale.
            if not math.isfinite(float(res.sum())):
                self._bad[j] = self._bad[j] + int((~torch.isfinite(res)).sum())
            scales[op.start // fp8.band(it.src.shape)].copy_(row)
            if self.cuda:
                host_out.copy_(out)  # synchronous: the scale row came back the same way
        return host_out

    def _change(self, op: _Op, it: Item, wd: torch.dtype, changes: dict) -> torch.Tensor:
        """The chunk of ``it``'s change: ``term - base``, a stored delta, or several combined by ``it.mix``."""
        key = (it.terms, it.base, it.mix, wd)
        if key in changes:
            return changes[key]
        r, m, g = self.reader, op.n, len(changes)
        b = None
        if it.base is not None:
            b = self._value(op, it, it.base, r.work("b", m, wd))
        ds = []
        for i, term in enumerate(it.terms):
            d = self._value(op, it, term, r.work(f"d{i}.{g}", m, wd))
            if b is not None:
                d.sub_(b)
            if it.mix is not None and it.mix.dare is not None:
                keep = dare_keep(it.mix.seed, f"{i}\x00{it.name}", op.start, m, it.mix.dare, self.device)
                d.masked_fill_(~keep, 0).div_(it.mix.dare)
            elif it.mix is not None and it.mix.trims:
                d.masked_fill_(d.abs() < self._threshold(it, i, wd), 0)
            ds.append(d)
        if it.mix is None:
            changes[key] = ds[0]
        else:
            out = r.work(f"d.{g}", m, wd)
            changes[key] = combine(ds, it.mix, out, r.work("mix.s", m, wd), r.work("mix.v", m, wd), r.work("mix.w", m, wd))
        return changes[key]

    def _threshold(self, it: Item, i: int, wd: torch.dtype) -> float:
        """TIES: the k-th largest ``|term_i - base|`` of the whole tensor, computed as the chunks compute it.

        The one place a whole tensor is held: its ``|d|`` in the working dtype,
        partitioned in place on the host.
        """
        key = (it.terms[i], it.base, wd)
        if key not in self._thresholds:
            r, term, scales = self.reader, it.terms[i], dict(it.fp8)
            absd = torch.empty(term.numel, dtype=wd)
            for s, c in r.spans(term, fp8.band(term.shape) if it.fp8 else None):
                seg = absd[s:s + c]
                seg.copy_(r.load_value("ties.t", term, s, c, wd, scales.get(term)))
                if it.base is not None:
                    seg.sub_(r.load_value("ties.b", it.base, s, c, wd, scales.get(it.base)))
                seg.abs_()
            self._thresholds[key] = kth_largest(absd.numpy(), it.mix.density)
        return self._thresholds[key]

    def _dev(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return x
        return x.to(self.device, non_blocking=True)

    def _write(self, op: _Op, fds: list[int]) -> None:
        if op.kind == "copy":
            src = self.reader.fd(op.first)
            for fd in fds:
                copy_range(src, op.first.start, fd, op.nbytes, op.first)
            n = op.nbytes
        elif op.kind == "hole":
            # The scales of a requantized graft that comes later in this file.
            for fd in fds:
                write_all(fd, bytes(op.nbytes))
            n = op.nbytes
        else:
            if op.event is not None:
                op.event.synchronize()
            for fd, out in zip(fds, op.outs):
                write_all(fd, out.view(torch.uint8).numpy())
            n = op.outs[0].numel() * op.outs[0].element_size()
            if op.last and op.items[0].dtype == fp8.CODE and op.items[0].action == "graft":
                for j, (fd, it) in enumerate(zip(fds, op.items)):
                    name = dict(it.fp8)[it.src].name
                    pwrite_all(fd, self._qscales.pop((j, name)).numpy(), self._holes[j][name])
        for st in self._outs:
            st.bytes_written += n
        self.progress(n * len(fds))

    # -- driving --------------------------------------------------------------

    def write_shard(self, shard: Shard, path: Path) -> None:
        """Write one output file: header, then every tensor in ``shard`` order; counted in ``self.stats``."""
        self.write_shards([shard], [path])

    def write_shards(self, shards: list[Shard], paths: list[Path], stats: list[Stats] | None = None) -> None:
        """Write the same shard of several outputs (tuned checkpoints, alpha values) in one pass over the inputs.

        The shards must list the same tensors in the same order; a tensor
        several of them read (instruct, base) is read once for all. Each
        output's counters go to its own entry of ``stats`` (default: one
        output, counted in ``self.stats``).
        """
        if any([i.name for i in s.items] != [i.name for i in shards[0].items] for s in shards):
            raise ValueError("write_shards needs shards with the same layout")
        self._outs = list(stats) if stats is not None else [self.stats] + [Stats() for _ in shards[1:]]
        self._tensor_bad = [0] * len(shards)
        self._holes = [_holes(shard) for shard in shards]
        fds: list[int] = []
        sizes: list[int] = []
        try:
            for shard, path in zip(shards, paths):
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                head = shard_header(shard)
                sizes.append(len(head) + shard.nbytes)
                preallocate(fds[-1], sizes[-1])
                write_all(fds[-1], head)
            self._pipeline(self._ops(shards), fds, self._workers(shards))
            for fd, size, path in zip(fds, sizes, paths):
                # A preallocated file has its full size from the start: a short
                # write would leave zeros where a plain file would be short.
                if os.lseek(fd, 0, os.SEEK_CUR) != size:
                    raise RuntimeError(f"{path}: wrote {os.lseek(fd, 0, os.SEEK_CUR)} bytes, planned {size}")
        finally:
            for fd in fds:
                os.close(fd)

    def _workers(self, shards: list[Shard]) -> int:
        """Compute workers for these shards: one on CUDA (one stream does the work) and for TIES, whose
        per-tensor threshold is computed and dropped by the compute stage in tensor order; else one per core."""
        if self.cuda or any(it.mix is not None and it.mix.trims for s in shards for it in s.items):
            return 1
        return self.workers or default_workers()

    def _pipeline(self, ops: Iterator[_Op], fds: list[int], workers: int = 1) -> None:
        """The three stages (``stages.run``) over ``ops``: read ahead, compute here and on helpers, write in order."""

        def read(op: _Op) -> None:
            if op.kind == "chunk":
                self._read(op)
            elif op.kind == "copy":
                # Counted by the reader, so that only its thread adds to bytes_read.
                self.stats.bytes_read += op.nbytes

        def write(op: _Op) -> None:
            self._write(op, fds)
            if op.kind == "chunk":
                self._account(op)

        saved = torch.get_num_threads()
        # Parallel chunks scale with the cores where torch's own per-op
        # threads sync every few microseconds on chunk-sized ops, so each
        # worker runs its ops on one thread. A single worker (CUDA, TIES)
        # may use the cores the reader and writer threads leave.
        torch.set_num_threads(1 if workers > 1 else max(1, min(4, (os.cpu_count() or 1) - 2)))
        # The objects alive now (torch's modules: ~170K) are kept out of the
        # collector's full passes while chunks stream (see heap.py).
        try:
            with heap.held():
                stages.run(ops, read=read, compute=self._compute, write=write, bind=self.reader.bind,
                           context=lambda: torch.cuda.stream(self._stream) if self.cuda else nullcontext(),
                           cost=self._cost, workers=workers)
        finally:
            torch.set_num_threads(saved)


def _add_scaled(acc: torch.Tensor, x: torch.Tensor, alpha: float, scratch: torch.Tensor) -> None:
    """``acc += alpha * x``, ``scratch`` holding ``alpha * x`` (it may be ``x`` itself when ``x`` is scratch too).

    Two IEEE operations, each rounded once, on every device: add_(x, alpha=)
    may or may not be one fused multiply-add depending on the kernel (CPU
    vector loop, its scalar tail, CUDA), and CPU and CUDA must give the same bits.
    """
    if alpha != 1.0:
        x = torch.mul(x, alpha, out=scratch)
    acc.add_(x)


def _holes(shard: Shard) -> dict[str, int]:
    """File offsets of the scale tensors the engine writes after their FP8 weight; each must precede its weight."""
    where, off = {}, len(shard_header(shard))
    for it in shard.items:
        if it.action == "scale":
            where[it.name] = off
        elif it.action == "graft" and it.dtype == fp8.CODE and dict(it.fp8)[it.src].name not in where:
            raise ValueError(f"'{it.name}': its scale item must come before it in the shard")
        off += it.nbytes
    return where
