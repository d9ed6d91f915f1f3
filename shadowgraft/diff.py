"""``shadowgraft.diff``: the fine-tuning change ``tuned - base`` as its own artefact.

Two forms, both written atomically like ``apply``'s output:

- the full delta: a sharded safetensors folder of ``D = W_tuned - W_base``
  for the chosen scope, which ``apply --delta`` adds to any sibling instruct
  model. The default dtype is the engine's working precision (F32 for 16-bit
  models, F64 for F32 ones), so ``diff`` + ``apply --delta`` writes the same
  bytes as ``apply --base --tuned``;
- a low-rank "shadow adapter" (``rank`` / ``energy``): every 2-D delta
  factored by truncated SVD into a standard PEFT LoRA adapter folder, one
  tensor in memory at a time.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .checkpoint import Checkpoint
from .dtypes import parse_dtype
from .errors import ShadowgraftError
from .files import read_config
from .header import FLOAT_DTYPES
from .naming import module_kind
from .plan import Item, Plan, select
from .card import write_delta_card
from .record import write_record
from .shards import parse_size, plan_shards
from .verify import check_written
from .writer import OutputDir, write_index

DEFAULT_SHARD = "5GB"


@dataclass
class DiffResult:
    """What ``diff`` wrote: the folder, its kind, and (low-rank) the per-tensor report."""

    output: Path
    kind: str  # "delta" or "lowrank"
    plan: Plan | None = None
    tensors: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0


def diff(
    *,
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str = "auto",
    scope: str = "linear",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    max_shard_size: str | int | None = DEFAULT_SHARD,
    device: str = "auto",
    strict: bool = False,
    command: str | None = None,
) -> DiffResult:
    """Write ``tuned - base`` to ``output``: the full delta, or with ``rank`` / ``energy`` a PEFT LoRA adapter.

    >>> from shadowgraft.diff import diff
    >>> diff(base="./base", tuned="./tuned", output="./delta")                  # doctest: +SKIP
    >>> diff(base="./base", tuned="./tuned", output="./shadow-lora", rank=64)    # doctest: +SKIP
    """
    from .graft import pick_device

    lowrank = rank is not None or energy is not None
    if rank is not None and (type(rank) is not int or rank <= 0):
        raise ShadowgraftError(f"--rank must be a positive integer, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ShadowgraftError(f"--energy must be in (0, 1], got {energy}")
    out_dtype = parse_dtype(dtype)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ShadowgraftError(f"--dtype {dtype} is not a float type; use auto, float64, float32, bfloat16 or float16")
    # SVD is real compute, so auto picks CUDA for it when there is one; a full delta is I/O bound.
    dev = pick_device(device, matmul=lowrank)
    outdir = OutputDir(output, overwrite=overwrite, inputs=(base, tuned))
    outdir.check()
    t0 = time.perf_counter()
    with ExitStack() as stack:
        b = stack.enter_context(Checkpoint.open(base))
        t = stack.enter_context(Checkpoint.open(tuned))
        chosen, warnings = _choose(b, t, scope=scope, include=include, exclude=exclude)
        record = {
            "shadowgraft_version": __version__,
            "inputs": {"base": b.describe(), "tuned": t.describe()},
            "scope": scope, "include": list(include), "exclude": list(exclude),
            "command": command or _command(base, tuned, output, rank=rank, energy=energy, dtype=dtype, scope=scope,
                                           include=include, exclude=exclude),
            "device": dev,
        }
        if lowrank:
            res = _write_lowrank(b, t, chosen, outdir, rank=rank, energy=energy, dtype=out_dtype or "F32", device=dev,
                                strict=strict, progress=progress, on_total=on_total, record=record, warnings=warnings)
        else:
            res = _write_delta(b, t, chosen, outdir, dtype=out_dtype, max_shard_size=parse_size(max_shard_size),
                               device=dev, strict=strict, progress=progress, on_total=on_total, record=record,
                               warnings=warnings, scope=scope)
    res.seconds = time.perf_counter() - t0
    return res


def _command(base, tuned, output, *, rank, energy, dtype, scope, include, exclude) -> str:
    """The CLI line that makes this output (also for Python API calls, where argv is someone else's)."""
    words = ["shadowgraft", "diff", os.fspath(base), os.fspath(tuned), "--output", os.fspath(output)]
    for flag, value in (("--rank", rank), ("--energy", energy)):
        if value is not None:
            words += [flag, str(value)]
    if dtype != "auto":
        words += ["--dtype", dtype]
    if scope != "linear":
        words += ["--scope", scope]
    for flag, values in (("--include", include), ("--exclude", exclude)):
        for v in values:
            words += [flag, v]
    return shlex.join(words)


def _choose(b: Checkpoint, t: Checkpoint, *, scope, include, exclude) -> tuple[list[str], list[str]]:
    """Names of tuned's tensors in scope, checked against base; plus warnings."""
    pick = select(t, scope=scope, include=include, exclude=exclude)
    chosen = [n for n in t.tensors if pick(n)]
    problems = []
    for n in chosen:
        if n not in b:
            problems.append(f"'{n}' is missing from base ({b.source})")
        elif b[n].shape != t[n].shape:
            problems.append(f"'{n}': base {tuple(b[n].shape)} != tuned {tuple(t[n].shape)}")
        elif not (b[n].is_float and t[n].is_float):
            problems.append(f"'{n}' is {b[n].dtype} in base and {t[n].dtype} in tuned; only float tensors have a delta")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShadowgraftError("; ".join(problems[:3]) + more + "; exclude them with --exclude REGEX or fix the inputs")
    if not chosen:
        raise ShadowgraftError(f"no tensor of {t.source} is selected by --scope {scope}/--include/--exclude; nothing to diff")
    warnings = []
    extra = [n for n in b.tensors if n not in t.tensors]
    if extra:
        warnings.append(f"{len(extra)} tensor(s) only in base are ignored: {', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}")
    return chosen, warnings


def delta_dtype(base_dtype: str, tuned_dtype: str) -> str:
    """The engine's working precision for this pair, which ``--dtype auto`` stores exactly.

    >>> delta_dtype("BF16", "BF16"), delta_dtype("F32", "F32")
    ('F32', 'F64')
    """
    return "F64" if {base_dtype, tuned_dtype} & {"F32", "F64"} else "F32"


def plan_delta(b: Checkpoint, t: Checkpoint, chosen: list[str], *, dtype: str | None = None,
               max_shard_size: int | None = None, scope: str = "linear", warnings: Sequence[str] = ()) -> Plan:
    """One ``delta`` item per chosen tensor: the engine writes ``tuned - base`` (src = tuned)."""
    items = [Item(n, "delta", dtype or delta_dtype(b[n].dtype, t[n].dtype), t[n], base=b[n]) for n in chosen]
    return Plan(tuple(plan_shards(t, items, max_shard_size)), 1.0, scope, tuple(warnings))


def _write_delta(b, t, chosen, outdir: OutputDir, *, dtype, max_shard_size, device, strict, progress, on_total, record,
                 warnings, scope) -> DiffResult:
    from .engine import Engine

    plan = plan_delta(b, t, chosen, dtype=dtype, max_shard_size=max_shard_size, scope=scope, warnings=warnings)
    outdir.check_space(plan.nbytes)
    if on_total is not None:
        on_total(plan.nbytes)
    engine = Engine([b, t], device=device, progress=progress)
    t0 = time.perf_counter()
    with outdir as tmp:
        for shard in plan.shards:
            engine.write_shard(shard, tmp / shard.file)
        write_index(tmp, plan.shards)
        check_written(tmp, plan, what="delta")
        if strict and engine.stats.nonfinite:
            name, count = next(iter(engine.stats.nonfinite.items()))
            raise ShadowgraftError(f"'{name}': {count} NaN/Inf value(s) in the delta; check the inputs, or drop --strict")
        record.update(kind="delta", formula="D = W_tuned - W_base", alpha=1.0,
                      dtype=sorted({i.dtype for i in plan.items}),
                      tensors=[i.name for i in plan.items], nonfinite=engine.stats.nonfinite,
                      seconds=round(time.perf_counter() - t0, 3), warnings=list(warnings),
                      usage="shadowgraft apply --instruct INSTRUCT --delta THIS_FOLDER --output OUT")
        write_record(tmp, record)
        write_delta_card(tmp, record)
    return DiffResult(outdir.final, "delta", plan=plan, warnings=list(warnings), bytes_written=engine.stats.bytes_written)


def _write_lowrank(b, t, chosen, outdir: OutputDir, *, rank, energy, dtype, device, strict, progress, on_total, record,
                   warnings) -> DiffResult:
    import torch

    from .lowrank import AdapterWriter, adapter_config, factorize, is_conv1d
    from .stream import Reader

    model_type, task_type = _model_kind(t)
    total_in = sum(t[n].nbytes + b[n].nbytes for n in chosen)
    if on_total is not None:
        on_total(total_in)
    progress = progress or (lambda n: None)
    reader = Reader([b, t], device=device)

    def delta(n: str):
        # One tensor at a time: both inputs upcast into reused buffers, subtracted in place.
        return reader.load_float("t", t[n], 0, t[n].numel).sub_(reader.load_float("b", b[n], 0, b[n].numel)).view(t[n].shape)

    def not_matrix(n: str) -> str | None:
        if len(t[n].shape) != 2:
            return f"{len(t[n].shape)}-D"
        return None if n.endswith(".weight") else "not a module weight"

    if strict:
        # Refuse before the output folder exists; vectors are small, so reading them twice is cheap.
        for n in chosen:
            why = not_matrix(n)
            if why and bool(delta(n).any()):
                raise ShadowgraftError(f"'{n}': a {why} delta cannot be stored as LoRA factors; drop --strict to leave it "
                                       "out (it is reported), or skip it with --exclude")
    rows: list[dict] = []
    t0 = time.perf_counter()
    with outdir as tmp:
        writer = AdapterWriter(tmp, dtype=dtype)
        try:
            for n in chosen:
                ti, bi = t[n], b[n]
                d = delta(n)
                norm2 = float(torch.linalg.vector_norm(d)) ** 2
                if not math.isfinite(norm2):
                    raise ShadowgraftError(f"'{n}': the delta holds NaN/Inf values, so no low-rank fit exists; "
                                           "check the inputs or skip it with --exclude")
                row = {"name": n, "shape": list(ti.shape), "norm": norm2 ** 0.5}
                module = n[: -len(".weight")]
                why = not_matrix(n)
                if why:
                    row.update(status="zero" if norm2 == 0 else f"dropped ({why})", rank=0, energy=0.0 if norm2 else 1.0)
                else:
                    emb = is_embedding(n)
                    # PEFT's change for embeddings and Conv1D is (B @ A).T: factor the transpose.
                    tr = emb or is_conv1d(module, model_type)
                    f = factorize(d.T if tr else d, rank=rank, energy=energy)
                    if f is None:
                        row.update(status="zero", rank=0, energy=1.0, rel_error=0.0)
                    else:
                        writer.add(module, f, embedding=emb)
                        row.update(status="lora", rank=f.rank, energy=f.energy, rel_error=f.rel_error, method=f.method,
                                   transposed=tr)
                rows.append(row)
                progress(ti.nbytes + bi.nbytes)
            if not writer.ranks:
                raise ShadowgraftError("every selected delta is zero or not a matrix, so there is no adapter to write; "
                                       "check --scope/--include, or diff without --rank")
            conv = any(is_conv1d(m, model_type) and m not in writer.embeddings for m in writer.ranks)
            base_id = record["inputs"]["base"].get("repo_id") or record["inputs"]["base"]["path"]
            modules = {m[: -len(".weight")] for m in t.tensors if m.endswith(".weight")}
            config = adapter_config(ranks=writer.ranks, modules_in_model=modules, fan_in_fan_out=conv,
                                    base_model=base_id, task_type=task_type)
            writer.finish(config)
        finally:
            writer.close()
        summary = _summary(rows, writer.nbytes)
        record.update(kind="lowrank", formula="W_tuned - W_base ~ B @ A (lora_alpha = r, so scale 1)", rank=rank,
                      energy=energy, dtype=dtype, summary=summary, tensors=rows, warnings=list(warnings),
                      seconds=round(time.perf_counter() - t0, 3),
                      usage="shadowgraft apply --instruct INSTRUCT --adapter THIS_FOLDER --output OUT")
        write_record(tmp, record)
        write_delta_card(tmp, record)
    return DiffResult(outdir.final, "lowrank", tensors=rows, summary=summary, warnings=list(warnings),
                      bytes_written=writer.nbytes)


def _summary(rows: list[dict], nbytes: int) -> dict:
    lora = [r for r in rows if r["status"] == "lora"]
    total = sum(r["norm"] ** 2 for r in rows)
    kept = sum(r["norm"] ** 2 * r["energy"] for r in lora) + sum(r["norm"] ** 2 for r in rows if r["status"] == "zero")
    resid = sum((r["norm"] * r["rel_error"]) ** 2 for r in lora) + sum(r["norm"] ** 2 for r in rows if r["status"].startswith("dropped"))
    worst = min(lora, key=lambda r: r["energy"]) if lora else None
    return {
        "modules": len(lora),
        "dropped": sum(1 for r in rows if r["status"].startswith("dropped")),
        "zero": sum(1 for r in rows if r["status"] == "zero"),
        "rank_min": min((r["rank"] for r in lora), default=0),
        "rank_max": max((r["rank"] for r in lora), default=0),
        # Over every selected tensor, dropped ones counting as fully lost.
        "energy_total": kept / total if total else 1.0,
        "rel_error_total": (resid / total) ** 0.5 if total else 0.0,
        "energy_mean": sum(r["energy"] for r in lora) / len(lora) if lora else 0.0,
        "energy_min": worst["energy"] if worst else 0.0,
        "worst": worst["name"] if worst else None,
        "adapter_bytes": nbytes,
    }


def _model_kind(ck: Checkpoint) -> tuple[str | None, str | None]:
    """``(model_type, PEFT task_type)`` from the checkpoint's config.json, when it has one."""
    cfg = read_config(ck.root)
    archs = cfg.get("architectures") or []
    causal = any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)
    return cfg.get("model_type"), "CAUSAL_LM" if causal else None


def is_embedding(name: str) -> bool:
    """Embedding tables get PEFT's ``lora_embedding_A/B`` (their change is ``(B @ A).T``)."""
    return module_kind(name) == "embed"
