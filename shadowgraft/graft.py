"""``shadowgraft.apply``: open inputs, plan, stream the graft, write the folder atomically."""

from __future__ import annotations

import json
import os
import sys
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
from .writer import OutputDir, copy_side_files, index_json


@dataclass
class Result:
    """What ``apply`` did: the plan it followed, run statistics, and where the output is."""

    plan: Plan
    output: Path | None
    stats: Stats = field(default_factory=Stats)
    url: str | None = None


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
) -> Result:
    """Graft ``alpha * (tuned - base)`` (or a delta, or a LoRA adapter) onto ``instruct`` into ``output``.

    >>> shadowgraft.apply(instruct="./instruct", base="./base", tuned="./tuned", output="./out")  # doctest: +SKIP
    """
    modes = [base is not None or tuned is not None, delta is not None, adapter is not None]
    if sum(modes) != 1 or (modes[0] and (base is None or tuned is None)):
        raise ShadowgraftError("give exactly one of: --base with --tuned, --delta, or --adapter")
    if not math_finite(alpha):
        raise ShadowgraftError(f"--alpha must be a finite number, got {alpha}")
    out_dtype = parse_dtype(dtype)
    shard_size = parse_size(max_shard_size)
    dev = _pick_device(device)
    outdir = OutputDir(Path(output), overwrite=overwrite)
    if not dry_run:
        outdir.check()
    with ExitStack() as stack:
        ins = stack.enter_context(Checkpoint.open(instruct))
        inputs = {"instruct": ins}
        if adapter is not None:
            from .lora import open_adapter, plan_adapter

            ad = open_adapter(adapter)
            inputs["adapter"] = ad
            plan = plan_adapter(ins, ad, alpha=alpha, scope=scope, include=include, exclude=exclude,
                                dtype=out_dtype, max_shard_size=shard_size)
        else:
            for label, spec in (("base", base), ("tuned", tuned), ("delta", delta)):
                if spec is not None:
                    inputs[label] = stack.enter_context(Checkpoint.open(spec))
            plan = plan_graft(ins, base=inputs.get("base"), tuned=inputs.get("tuned"), delta=inputs.get("delta"),
                              alpha=alpha, scope=scope, include=include, exclude=exclude,
                              dtype=out_dtype, max_shard_size=shard_size)
        if on_plan is not None:
            on_plan(plan)
        if dry_run:
            return Result(plan, None)
        outdir.check_space(plan.nbytes)
        cks = [c for c in inputs.values() if isinstance(c, Checkpoint)]
        engine = Engine(cks + list(getattr(inputs.get("adapter"), "checkpoints", [])), device=dev, progress=progress)
        t0 = time.perf_counter()
        with outdir as tmp:
            for shard in plan.shards:
                engine.write_shard(shard, tmp / shard.file, plan.alpha)
            if len(plan.shards) > 1:
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json(plan.shards), indent=2) + "\n")
            _check_written(tmp, plan)
            if strict and engine.stats.nonfinite:
                name, count = next(iter(engine.stats.nonfinite.items()))
                raise ShadowgraftError(
                    f"'{name}': {count} NaN/Inf value(s) after grafting ({len(engine.stats.nonfinite)} tensor(s) affected); "
                    "check the inputs, or drop --strict to write them anyway"
                )
            copy_side_files(ins.root, tmp)
            engine.stats.seconds = time.perf_counter() - t0
            record = provenance(inputs, plan, command=command, stats=engine.stats, device=str(dev))
            (tmp / "shadowgraft.json").write_text(json.dumps(record, indent=2) + "\n")
            from .card import write_card

            write_card(tmp, record, instruct_root=ins.root)
        result = Result(plan, outdir.final, engine.stats)
    if push_to_hub:
        from .hub import push

        result.url = push(result.output, push_to_hub, private=private)
    return result


def math_finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _pick_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ShadowgraftError(f"unknown device '{device}'; use auto, cpu or cuda")
    if device == "auto":
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShadowgraftError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return device


def _check_written(folder: Path, plan: Plan) -> None:
    """Re-open what we wrote the way a user will, and compare it with the plan."""
    ck = Checkpoint.open(folder)
    try:
        want = {i.name: (i.dtype, i.shape) for i in plan.items}
        got = {t.name: (t.dtype, t.shape) for t in ck}
        if want != got:
            raise ShadowgraftError(f"{folder}: written checkpoint does not match the plan; this is a bug, please report it")
    finally:
        ck.close()


def describe(ck) -> dict:
    """Provenance of one input: Hub id and commit, or local path, plus header hashes."""
    if isinstance(ck, Checkpoint):
        d = {"source": ck.source}
        if ck.repo_id:
            d.update(repo_id=ck.repo_id, revision=ck.revision, commit=ck.commit)
        else:
            d["path"] = str(Path(ck.source).absolute())
        d["header_sha256"] = ck.header_hashes()
        return d
    return ck.describe()


def provenance(inputs: dict, plan: Plan, *, command: str | None, stats: Stats, device: str) -> dict:
    return {
        "shadowgraft_version": __version__,
        "formula": "W_out = W_instruct + alpha * (W_tuned - W_base)",
        "mode": "adapter" if "adapter" in inputs else "delta" if "delta" in inputs else "full",
        "inputs": {label: describe(ck) for label, ck in inputs.items()},
        "alpha": plan.alpha,
        "scope": plan.scope,
        "command": command or " ".join(["shadowgraft", *sys.argv[1:]]),
        "device": device,
        "grafted": plan.grafted,
        "copied": [i.name for i in plan.items if i.action != "graft"],
        "seconds": round(stats.seconds, 3),
        "nonfinite": stats.nonfinite,
        "warnings": list(plan.warnings),
    }
