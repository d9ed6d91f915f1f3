"""``shadowgraft.apply``: open inputs, plan, stream the graft, write the folder atomically."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .checkpoint import Checkpoint
from .dtypes import parse_dtype
from .engine import Engine, Stats
from .errors import ShadowgraftError
from .mix import Mix
from .plan import Plan, plan_graft
from .shards import parse_size
from .recipe import cli_line, expand_tuned, parse_alpha_for, parse_alphas, parse_mix
from .record import write_record
from .verify import check_written
from .writer import OutputDir, check_output_path, copy_side_files, side_files, write_index


@dataclass
class OutputResult:
    """One output folder of a run: where it is, the plan it followed, its alpha and its own counters."""

    output: Path
    plan: Plan
    alpha: float
    stats: Stats


@dataclass
class Result:
    """What ``apply`` did: the plan it followed, run statistics, and where the output is.

    With several outputs (an alpha grid, several tuned checkpoints)
    ``results`` holds one ``OutputResult`` per output folder and ``plan``,
    ``output`` and ``stats`` describe the first.
    """

    plan: Plan | None
    output: Path | None
    stats: Stats = field(default_factory=Stats)
    url: str | None = None
    outputs: list[Path] = field(default_factory=list)
    results: list[OutputResult] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """One output: what to write (its plan), where (its folder), what it came from, and its own counters."""

    plan: Plan
    out: OutputDir
    inputs: dict  # provenance: role -> Checkpoint or Adapter
    label: str  # how messages name this output
    stats: Stats = field(default_factory=Stats)


def apply(
    *,
    instruct: str | os.PathLike,
    output: str | os.PathLike,
    base: str | os.PathLike | None = None,
    tuned: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    delta: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    alpha: float | Sequence[float] = 1.0,
    alpha_for: Sequence[str | tuple[str, float]] = (),
    combine: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    sparsify: str | None = None,
    seed: int = 0,
    scope: str = "linear",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    strict: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    command: str | None = None,
    extra: dict | None = None,
) -> Result:
    """Graft ``alpha * (tuned - base)`` (or a delta, or a LoRA adapter) onto ``instruct`` into ``output``.

    ``alpha`` may be a list (a grid: one output per value, ``output/alpha-<value>``);
    ``alpha_for`` rules (``"REGEX=VALUE"``) set it per tensor. Several ``tuned``
    give one output each, or one output with ``combine`` (``sum`` / ``ties``).
    ``extra`` adds top-level entries to ``shadowgraft.json`` (e.g. ``training``, ``similarity``).

    >>> shadowgraft.apply(instruct="./instruct", base="./base", tuned="./tuned", output="./out")  # doctest: +SKIP
    """
    modes = [base is not None or tuned is not None, delta is not None, adapter is not None]
    if sum(modes) != 1 or (modes[0] and (base is None or tuned is None)):
        raise ShadowgraftError("give exactly one of: --base with --tuned, --delta, or --adapter")
    alphas = parse_alphas(alpha)
    rules = parse_alpha_for(alpha_for)
    out_dtype = parse_dtype(dtype)
    shard_size = parse_size(max_shard_size)
    dev = pick_device(device, matmul=adapter is not None)
    tuned_specs = expand_tuned(tuned) if tuned is not None else [None]
    mix = parse_mix(combine=combine, weights=weights, density=density, sparsify=sparsify, seed=seed,
                    n_tuned=len(tuned_specs) if tuned is not None else 0)
    if mix is not None and adapter is not None:
        raise ShadowgraftError("--combine and --sparsify work on deltas (--base with --tuned, or --delta), not on --adapter")
    if command is None:
        # Rebuilt from the arguments: from Python, sys.argv is someone else's command.
        command = cli_line(instruct=instruct, base=base, tuned=tuned, delta=delta, adapter=adapter, output=output,
                           alpha=alphas, alpha_for=rules, mix=mix, scope=scope, include=include, exclude=exclude,
                           dtype=dtype, max_shard_size=max_shard_size)
    groups = [tuned_specs] if mix is not None and tuned is not None else [[t] for t in tuned_specs]
    nested = len(groups) > 1 or len(alphas) > 1
    if push_to_hub and nested:
        raise ShadowgraftError("--push-to-hub takes one output; push each folder with `shadowgraft push`")
    if push_to_hub and not dry_run:
        # A bad id, or HF_HUB_OFFLINE, would otherwise fail only after the whole graft.
        from .publish import check_push_target

        check_push_target(push_to_hub)
    if not dry_run:
        _check_output(output, nested=nested, inputs=[instruct, base, *tuned_specs, delta, adapter])
    kw = dict(alpha_for=rules, scope=scope, include=include, exclude=exclude, dtype=out_dtype, max_shard_size=shard_size)
    with ExitStack() as stack:
        ins = stack.enter_context(Checkpoint.open(instruct))
        jobs, failed = _plan_jobs(stack, ins, Path(output), base=base, delta=delta, adapter=adapter, groups=groups,
                                  alphas=alphas, mix=mix, overwrite=overwrite, dry_run=dry_run, kw=kw)
        for job in jobs:
            if on_plan is not None:
                on_plan(job.plan)
        if dry_run or not jobs:
            if failed:
                raise ShadowgraftError(f"{len(failed)} of {len(groups)} tuned checkpoints failed: " + "; ".join(failed))
            return Result(jobs[0].plan if jobs else None, None)
        made = _make_parents(job.out.final.parent for job in jobs)
        try:
            refused = _write(ins, jobs, dev=dev, strict=strict, progress=progress, command=command, extra=extra)
        finally:
            # A folder this run made and no output filled (every output refused, or interrupted) goes again.
            for d in reversed(made):
                with suppress(OSError):
                    d.rmdir()
    written = [j for j in jobs if not any(f.startswith(f"{j.label}: ") for f in refused)]
    result = Result(jobs[0].plan, jobs[0].out.final, jobs[0].stats, outputs=[j.out.final for j in written],
                    results=[OutputResult(j.out.final, j.plan, j.plan.alpha, j.stats) for j in written])
    if failed or refused:
        # A tuned checkpoint refused while planning has no output for any alpha.
        if len(alphas) == 1:
            what = f"{len(failed) + len(refused)} of {len(groups)} tuned checkpoints"
        else:
            what = f"{len(failed) * len(alphas) + len(refused)} of {len(groups) * len(alphas)} outputs"
        rest = " (the other outputs are complete)" if written else ""
        raise ShadowgraftError(f"{what} failed{rest}: " + "; ".join(failed + refused))
    if push_to_hub:
        from .publish import push

        result.url = push(result.output, push_to_hub, private=private)
    return result


def _make_parents(folders) -> list[Path]:
    """Create each missing folder (and its missing parents); returns the ones created, parents first."""
    made: list[Path] = []
    for folder in folders:
        missing = []
        p = Path(folder)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            made.append(d)
    return made


def _check_output(output, *, nested: bool, inputs: list) -> None:
    """What needs no tensor data: the output is no input and replaces nothing it must not; a nested root can hold outputs."""
    check_output_path(output, inputs=inputs)
    if nested:
        root = Path(output)
        if root.exists() and not root.is_dir():
            raise ShadowgraftError(f"{root}: exists and is not a folder; choose another --output")
        if not root.absolute().parent.is_dir():
            raise FileNotFoundError(f"{root.absolute().parent}: output's parent folder does not exist; create it first")


def _plan_jobs(stack: ExitStack, ins: Checkpoint, output: Path, *, base, delta, adapter, groups: list[list],
               alphas: tuple[float, ...], mix: Mix | None, overwrite: bool, dry_run: bool, kw: dict) -> tuple[list[Job], list[str]]:
    """One Job per output: per tuned group (or the delta, or the adapter) and per alpha value.

    With several tuned groups a group that fails its checks is left out and
    named in the second list; the others go on.
    """
    jobs: list[Job] = []
    failed: list[str] = []
    many = len(groups) > 1

    def add(folder: Path, inputs: dict, plan_for: Callable[[float], Plan], label: str) -> None:
        for a in alphas:
            out = folder / f"alpha-{a!r}" if len(alphas) > 1 else folder
            outdir = OutputDir(out, overwrite=overwrite)
            if not dry_run and out.parent.is_dir():  # nested outputs' folders are made just before writing
                outdir.check()
            jobs.append(Job(plan_for(a), outdir, inputs, f"{label} alpha {a!r}" if len(alphas) > 1 else label))

    if adapter is not None:
        from .adapter import open_adapter
        from .lora import plan_adapter

        ad = stack.enter_context(open_adapter(adapter))
        add(output, {"instruct": ins, "adapter": ad}, lambda a: plan_adapter(ins, ad, alpha=a, **kw), "output")
    elif delta is not None:
        dk = stack.enter_context(Checkpoint.open(delta))
        if dk.root is not None and (dk.root / "adapter_config.json").is_file():
            raise ShadowgraftError(f"{delta}: is a PEFT adapter (adapter_config.json), not a delta; pass it with --adapter")
        add(output, {"instruct": ins, "delta": dk}, lambda a: plan_graft(ins, delta=dk, alpha=a, mix=mix, **kw), "output")
    else:
        bk = stack.enter_context(Checkpoint.open(base))
        for specs in groups:
            folder = output / Path(os.fspath(specs[0])).name if many else output
            try:
                tks = [stack.enter_context(Checkpoint.open(spec)) for spec in specs]
                roles = {"tuned": tks[0]} if len(tks) == 1 else {f"tuned_{k + 1}": t for k, t in enumerate(tks)}
                add(folder, {"instruct": ins, "base": bk, **roles},
                    lambda a: plan_graft(ins, base=bk, tuned=tks, alpha=a, mix=mix, **kw), os.fspath(specs[0]) if many else "output")
            except (ShadowgraftError, FileNotFoundError) as e:
                if not many:
                    raise
                failed.append(f"{specs[0]}: {e}")
    return jobs, failed


def _write(ins: Checkpoint, jobs: list[Job], *, dev: str, strict: bool, progress, command, extra=None) -> list[str]:
    """Stream every job's output in one pass over the inputs, then finish and commit each folder.

    Returns the outputs that failed on their own (``--strict`` with NaN/Inf
    in them): their folders are removed, the others committed.
    """
    for job in jobs:
        job.out.check_space(job.plan.nbytes * len(jobs))
    # Checkpoints are not hashable (a dataclass with mutable state); dedupe by identity.
    cks = list({id(c): c for j in jobs for x in j.inputs.values()
                for c in ([x] if isinstance(x, Checkpoint) else getattr(x, "checkpoints", []))}.values())
    side = side_files(ins.root)  # refused here, before a byte is written
    engine = Engine(cks, device=dev, progress=progress)
    t0 = time.perf_counter()
    failed: list[str] = []
    with ExitStack() as stack:
        # One stack per output, so an output can fail alone while the others commit.
        own = [ExitStack() for _ in jobs]
        tmps = []
        for job, js in zip(jobs, own):
            stack.push(js)
            tmps.append(js.enter_context(job.out))
        for k, shard in enumerate(jobs[0].plan.shards):
            engine.write_shards([j.plan.shards[k] for j in jobs], [t / shard.file for t in tmps], [j.stats for j in jobs])
        seconds = time.perf_counter() - t0
        from .card import write_card

        for job, tmp, js in zip(jobs, tmps, own):
            job.stats.seconds = seconds
            job.stats.bytes_read = engine.stats.bytes_read
            try:
                if strict and job.stats.nonfinite:
                    name, count = next(iter(job.stats.nonfinite.items()))
                    raise ShadowgraftError(
                        f"'{name}': {count} NaN/Inf value(s) after grafting ({len(job.stats.nonfinite)} tensor(s) affected); "
                        "check the inputs, or drop --strict to write them anyway")
                write_index(tmp, job.plan.shards)
                outputs = check_written(tmp, job.plan)  # the cheap part of `shadowgraft verify`, each header read once
                copy_side_files(side, tmp, dequantized=job.plan.dequantized)
                record = provenance(job, command=command, device=str(dev), extra=extra)
                record["outputs"] = outputs
                write_record(tmp, record)
                write_card(tmp, record, instruct_root=ins.root)
            except ShadowgraftError as e:
                if len(jobs) == 1:
                    raise
                js.__exit__(type(e), e, e.__traceback__)
                failed.append(f"{job.label}: {e}")
                continue
            js.close()
    return failed


def pick_device(device: str, *, matmul: bool = False) -> str:
    """Resolve ``auto``: CUDA only for LoRA merges, whose B @ A products are real compute.

    A full or delta graft does a few flops per byte; one CPU core outruns
    the disk, so shipping the bytes to a GPU and back cannot make it faster.
    """
    import torch

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ShadowgraftError(f"unknown device '{device}'; use auto, cpu or cuda")
    if device == "auto":
        return "cuda" if matmul and torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShadowgraftError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return device


def provenance(job: Job, *, command: str | None, device: str, extra: dict | None = None) -> dict:
    """The ``shadowgraft.json`` record of one output."""
    plan, inputs, stats = job.plan, job.inputs, job.stats
    mix = plan.mix
    if "adapter" in inputs:
        mode, formula = "adapter", "W_out = W_instruct + alpha * scale * (B @ A)"
    elif "delta" in inputs:
        mode, formula = "delta", "W_out = W_instruct + alpha * D, D = W_tuned - W_base"
    elif mix is not None and len(mix.weights) > 1:
        mode = "combine"
        formula = ("W_out = W_instruct + alpha * sum_i w_i d_i, d_i = W_tuned_i - W_base" if mix.method == "sum" else
                   "W_out = W_instruct + alpha * TIES(d_i), d_i = W_tuned_i - W_base")
    else:
        mode, formula = "full", "W_out = W_instruct + alpha * (W_tuned - W_base)"
    if mix is not None and mix.dare is not None:
        formula += " (each d DARE-sparsified)"
    record = {
        "shadowgraft_version": __version__,
        "formula": formula,
        "mode": mode,
        "inputs": {label: ck.describe() for label, ck in inputs.items()},
        "alpha": plan.alpha,
        "scope": plan.scope,
        "command": command,
        "device": device,
        "grafted": plan.grafted,
        "copied": [i.name for i in plan.items if i.action != "graft"],
        "seconds": round(stats.seconds, 3),
        "nonfinite": stats.nonfinite,
        "warnings": list(plan.warnings),
        "notes": list(plan.notes),
    }
    if plan.renames:
        record["renamed"] = {label: r.to_dict() for label, r in plan.renames}
    if plan.alpha_for:
        record["alpha_for"] = [{"regex": p, "alpha": v} for p, v in plan.alpha_for]
        record["alphas"] = {i.name: i.alpha for i in plan.items if i.action == "graft" and i.alpha != plan.alpha}
    if mix is not None:
        record["combine"] = mix.describe()
    return {**record, **(extra or {})}
