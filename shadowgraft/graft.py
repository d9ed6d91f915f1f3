"""``shadowgraft.apply``: open inputs, plan, stream the graft, write the folder atomically."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .checkpoint import Checkpoint
from .dtypes import parse_dtype
from .engine import Engine, Stats
from .errors import ShadowgraftError
from .plan import Plan, parse_size, plan_graft
from .verify import check_output, record_outputs
from .writer import OutputDir, check_written, copy_side_files, write_index


@dataclass
class Result:
    """What ``apply`` did: the plan it followed, run statistics, and where the output is."""

    plan: Plan | None
    output: Path | None
    stats: Stats = field(default_factory=Stats)
    url: str | None = None
    outputs: list[Path] = field(default_factory=list)  # one per tuned checkpoint


def apply(
    *,
    instruct: str | os.PathLike,
    output: str | os.PathLike,
    base: str | os.PathLike | None = None,
    tuned: str | os.PathLike | None = None,
    delta: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    alpha: float = 1.0,
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

    ``extra`` adds top-level entries to ``shadowgraft.json`` (e.g. ``training``, ``similarity``).

    >>> shadowgraft.apply(instruct="./instruct", base="./base", tuned="./tuned", output="./out")  # doctest: +SKIP
    """
    modes = [base is not None or tuned is not None, delta is not None, adapter is not None]
    if sum(modes) != 1 or (modes[0] and (base is None or tuned is None)):
        raise ShadowgraftError("give exactly one of: --base with --tuned, --delta, or --adapter")
    if not math_finite(alpha):
        raise ShadowgraftError(f"--alpha must be a finite number, got {alpha}")
    out_dtype = parse_dtype(dtype)
    shard_size = parse_size(max_shard_size)
    if command is None:
        # Rebuilt from the arguments: from Python, sys.argv is someone else's command.
        command = cli_line(instruct=instruct, base=base, tuned=tuned, delta=delta, adapter=adapter, output=output,
                           alpha=alpha, scope=scope, include=include, exclude=exclude, dtype=dtype,
                           max_shard_size=max_shard_size)
    dev = pick_device(device, matmul=adapter is not None)
    tuned_specs = expand_tuned(tuned) if tuned is not None else [None]
    many = len(tuned_specs) > 1
    if many and not dry_run:
        Path(output).mkdir(parents=True, exist_ok=True)
    elif not dry_run:
        OutputDir(Path(output), overwrite=overwrite).check()
    kw = dict(alpha=alpha, scope=scope, include=include, exclude=exclude, dtype=out_dtype, max_shard_size=shard_size)
    with ExitStack() as stack:
        ins = stack.enter_context(Checkpoint.open(instruct))
        shared = {"instruct": ins}
        jobs: list[tuple[dict, Plan, OutputDir]] = []
        failed: list[str] = []
        if adapter is not None:
            from .lora import open_adapter, plan_adapter

            ad = stack.enter_context(open_adapter(adapter))
            shared["adapter"] = ad
            jobs.append(({}, plan_adapter(ins, ad, **kw), OutputDir(Path(output), overwrite=overwrite)))
        elif delta is not None:
            shared["delta"] = stack.enter_context(Checkpoint.open(delta))
            root = shared["delta"].root
            if root is not None and (root / "adapter_config.json").is_file():
                raise ShadowgraftError(f"{delta}: is a PEFT adapter (adapter_config.json), not a delta; pass it with --adapter")
            jobs.append(({}, plan_graft(ins, delta=shared["delta"], **kw), OutputDir(Path(output), overwrite=overwrite)))
        else:
            shared["base"] = stack.enter_context(Checkpoint.open(base))
            for spec in tuned_specs:
                out = Path(output) / Path(os.fspath(spec)).name if many else Path(output)
                try:
                    tk = stack.enter_context(Checkpoint.open(spec))
                    plan = plan_graft(ins, base=shared["base"], tuned=tk, **kw)
                    outdir = OutputDir(out, overwrite=overwrite)
                    if many and not dry_run:
                        outdir.check()
                except (ShadowgraftError, FileNotFoundError) as e:
                    if not many:
                        raise
                    failed.append(f"{spec}: {e}")
                    continue
                jobs.append(({"tuned": tk}, plan, outdir))
        for _, plan, _ in jobs:
            if on_plan is not None:
                on_plan(plan)
        if dry_run or not jobs:
            if failed:
                raise ShadowgraftError(f"{len(failed)} of {len(tuned_specs)} tuned checkpoints failed: " + "; ".join(failed))
            return Result(jobs[0][1] if jobs else None, None)
        result = _write(ins, shared, jobs, dev=dev, strict=strict, progress=progress, command=command, extra=extra)
    if failed:
        raise ShadowgraftError(f"{len(failed)} of {len(tuned_specs)} tuned checkpoints failed (the other outputs are complete): "
                               + "; ".join(failed))
    if push_to_hub:
        if many:
            raise ShadowgraftError("--push-to-hub takes one output; push each folder with `shadowgraft push`")
        from .hub import push

        result.url = push(result.output, push_to_hub, private=private)
    return result


def _write(ins: Checkpoint, shared: dict, jobs: list, *, dev: str, strict: bool, progress, command, extra=None) -> Result:
    """Stream every job's output in one pass over the inputs, then finish and commit each folder."""
    plans = [p for _, p, _ in jobs]
    for _, plan, outdir in jobs:
        outdir.check_space(plan.nbytes * len(jobs))
    cks = [c for c in shared.values() if isinstance(c, Checkpoint)] + [j["tuned"] for j, _, _ in jobs if "tuned" in j]
    cks += list(getattr(shared.get("adapter"), "checkpoints", []))
    engine = Engine(cks, device=dev, progress=progress)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        tmps = [stack.enter_context(outdir) for _, _, outdir in jobs]
        for k, shard in enumerate(plans[0].shards):
            engine.write_shards([p.shards[k] for p in plans], [t / shard.file for t in tmps], plans[0].alpha)
        if strict and engine.stats.nonfinite:
            name, count = next(iter(engine.stats.nonfinite.items()))
            raise ShadowgraftError(
                f"'{name}': {count} NaN/Inf value(s) after grafting ({len(engine.stats.nonfinite)} tensor(s) affected); "
                "check the inputs, or drop --strict to write them anyway"
            )
        engine.stats.seconds = time.perf_counter() - t0
        from .card import write_card

        for (own, plan, _), tmp in zip(jobs, tmps):
            write_index(tmp, plan.shards)
            check_written(tmp, plan)
            copy_side_files(ins.root, tmp)
            record = provenance({**shared, **own}, plan, command=command, stats=engine.stats, device=str(dev), extra=extra)
            record["outputs"] = record_outputs(tmp)
            (tmp / "shadowgraft.json").write_text(json.dumps(record, indent=2) + "\n")
            write_card(tmp, record, instruct_root=ins.root)
            check_output(tmp)  # the cheap part of `shadowgraft verify`, before the rename
    return Result(plans[0], jobs[0][2].final, engine.stats, outputs=[o.final for _, _, o in jobs])


def cli_line(*, include: Sequence[str], exclude: Sequence[str], tuned, alpha: float, scope: str, dtype: str,
             max_shard_size, **paths) -> str:
    """The ``shadowgraft apply`` command line equivalent to these arguments."""
    words = ["shadowgraft", "apply"]
    for flag in ("instruct", "base", "delta", "adapter"):
        if paths[flag] is not None:
            words += [f"--{flag}", os.fspath(paths[flag])]
    for t in (tuned if isinstance(tuned, (list, tuple)) else [tuned] if tuned is not None else []):
        words += ["--tuned", os.fspath(t)]
    words += ["--output", os.fspath(paths["output"])]
    if alpha != 1.0:
        words += ["--alpha", repr(alpha)]
    if scope != "linear":
        words += ["--scope", scope]
    for flag, values in (("--include", include), ("--exclude", exclude)):
        for v in values:
            words += [flag, v]
    if dtype != "auto":
        words += ["--dtype", dtype]
    if max_shard_size is not None:
        words += ["--max-shard-size", str(max_shard_size)]
    return shlex.join(words)


def expand_tuned(tuned) -> list:
    """One tuned spec, several, a quoted glob (``run/checkpoint-*``) or a run folder of ``checkpoint-N`` folders."""
    specs = list(tuned) if isinstance(tuned, (list, tuple)) else [tuned]
    out: list = []
    for spec in specs:
        text = os.fspath(spec)
        if any(c in text for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(text)), key=_natural)
            if not found:
                raise FileNotFoundError(f"{text}: no checkpoint matches this pattern")
            out += found
        elif Path(text).is_dir() and not any(Path(text).glob("*.safetensors")) and any(Path(text).glob("checkpoint-*")):
            out += sorted((str(p) for p in Path(text).glob("checkpoint-*") if p.is_dir()), key=_natural)
        else:
            out.append(spec)
    names = [Path(os.fspath(s)).name for s in out]
    if len(out) > 1 and len(set(names)) != len(names):
        raise ShadowgraftError("several tuned checkpoints share a folder name, so their outputs would collide; rename them")
    return out


def _natural(text: str) -> list:
    # checkpoint-100 sorts after checkpoint-20
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def math_finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


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


def describe(ck) -> dict:
    """Provenance of one input (a checkpoint or an adapter)."""
    return ck.describe()


def provenance(inputs: dict, plan: Plan, *, command: str | None, stats: Stats, device: str, extra: dict | None = None) -> dict:
    return {
        "shadowgraft_version": __version__,
        "formula": ("W_out = W_instruct + alpha * scale * (B @ A)" if "adapter" in inputs
                    else "W_out = W_instruct + alpha * D, D = W_tuned - W_base" if "delta" in inputs
                    else "W_out = W_instruct + alpha * (W_tuned - W_base)"),
        "mode": "adapter" if "adapter" in inputs else "delta" if "delta" in inputs else "full",
        "inputs": {label: describe(ck) for label, ck in inputs.items()},
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
        **(extra or {}),
    }
