"""``shadowgraft shadow-ft``: data -> base fine-tuned -> grafted onto instruct -> (Hub), in one call.

With ``objective="dpo"`` the training stage is preference tuning on BASE
(the paper's DPO variant); the graft is the same.

The run folder keeps every stage, so a failed later stage re-runs without
re-training:

    OUT/stages/stats.json   base vs instruct similarity (the paper's sigma)
    OUT/stages/train/       the fine-tuned base: a checkpoint, or a PEFT adapter
    OUT/model/              the grafted instruct model, with its model card

Running the same command again reuses a finished training stage (same data
hash and hyper-parameters), resumes an interrupted one from its last
checkpoint, and redoes the graft.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from .errors import ShadowgraftError


@dataclass(frozen=True)
class PipelineResult:
    """What ``shadow_ft`` produced."""

    model: Path  # the grafted instruct model
    stages: Path
    sigma_mean: float | None
    trained: bool  # False when a finished training stage was reused
    url: str | None = None
    warnings: tuple[str, ...] = ()
    nonfinite: dict = field(default_factory=dict)  # grafted tensor -> NaN/Inf count (written anyway without strict)


def shadow_ft(*, base: str | os.PathLike, instruct: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike,
              alpha: float = 1.0, scope: str = "linear", max_sigma: float | None = None, push_to_hub: str | None = None,
              private: bool = False, overwrite: bool = False, strict: bool = False, console: Console | None = None,
              **train_options) -> PipelineResult:
    """Fine-tune ``base`` on ``data`` and graft the change onto ``instruct``; ``train_options`` are ``TrainConfig`` fields.

    >>> shadow_ft(base="Qwen/Qwen3-4B-Base", instruct="Qwen/Qwen3-4B-Instruct-2507", data="math.jsonl",
    ...           output="./instruct-shadow-math", lora_rank=128)       # doctest: +SKIP
    """
    from .graft import apply
    from .train import TrainConfig
    from .train.data import sha256_file
    from .train.loop import DONE_NAME, train
    from .train.model import require_extra
    from .train.state import latest
    from .writer import check_output_path, listed, replacing

    check_output_path(output, inputs=[base, instruct, data])
    out = Path(os.path.realpath(output)) if Path(output).is_symlink() else Path(output)  # a link: the folder it names
    stages = out / "stages"
    say = console.print if console is not None else (lambda *a, **k: None)
    if not Path(data).is_file():
        raise FileNotFoundError(f"{data}: no such data file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output's parent folder does not exist; create it first")
    if out.exists() and any(out.iterdir()) and not stages.is_dir():
        raise ShadowgraftError(f"{out}: exists and is not a shadow-ft run folder (no stages/), so it is left alone; "
                               "choose another --output")
    foreign = _foreign(out)
    if foreign:
        raise ShadowgraftError(f"{out}: holds {listed(foreign)}, which "
                               "shadow-ft does not write, so it is not a shadow-ft run folder to reuse or replace; "
                               "move them out first, or choose another --output")
    train_dir = stages / "train"
    opts = {"chat_template_from": str(instruct), **train_options}
    cfg = TrainConfig(model=str(base), data=str(data), output=str(train_dir), **opts)
    cfg.check()
    require_extra(lora=cfg.is_lora)  # before the stats pass, which can take minutes on a large pair
    # An earlier run is moved aside until this one is complete: a refused or failed run puts it back.
    with replacing(out, enabled=overwrite):
        stages.mkdir(parents=True, exist_ok=True)
        warnings: list[str] = []

        say("[bold]1/3[/] similarity of base and instruct")
        similarity = _similarity(base, instruct, stages / "stats.json", max_sigma, scope)
        sigma = similarity["sigma_mean"]
        say(f"    sigma_mean {sigma:.4f} over {similarity['n_tensors']} block tensors (threshold {similarity['threshold']})")
        if not similarity["graftable"]:
            w = (f"base and instruct differ by sigma_mean {sigma:.4f}, above {similarity['threshold']}: {similarity['verdict']}; "
                 "check that --base is the instruct model's own base")
            warnings.append(w)
            say(f"[yellow]warning:[/] {w}")

        data_sha = sha256_file(data)
        done = train_dir / DONE_NAME
        if done.is_file():
            _check_reusable(json.loads(done.read_text()), cfg, data_sha, train_dir)
            say(f"[bold]2/3[/] training: reusing the finished run in {train_dir}")
            trained = False
        else:
            resume = latest(train_dir) is not None
            say(f"[bold]2/3[/] training {'(resuming) ' if resume else ''}{base} on {data} -> {train_dir}")
            train(config=replace(cfg, resume=resume, overwrite=not resume and train_dir.exists()), console=console)
            trained = True
        result = json.loads(done.read_text())

        say(f"[bold]3/3[/] grafting onto {instruct} -> {out / 'model'}")
        record = {
            "training": {"objective": cfg.objective, "data": str(Path(data).absolute()), "data_sha256": data_sha,
                         "base": str(base),
                         "examples": _examples(train_dir), "steps": result["steps"], "final_loss": result["loss"],
                         "hyperparameters": cfg.hyperparameters()},
            "similarity": {"a": str(base), "b": str(instruct), **{k: similarity[k] for k in
                           ("sigma_mean", "sigma_median", "sigma_max", "sigma_min", "sigma_weighted", "n_tensors")}},
        }
        kind = {"adapter": train_dir} if cfg.is_lora else {"base": base, "tuned": train_dir}
        res = apply(instruct=instruct, output=out / "model", alpha=alpha, scope=scope, overwrite=True, strict=strict,
                    push_to_hub=push_to_hub,
                    private=private, extra=record, **kind)
        return PipelineResult(res.output, stages, sigma, trained, res.url, tuple(warnings), dict(res.stats.nonfinite))


def _foreign(out: Path) -> list[str]:
    """What in a shadow-ft folder this command did not write, at any depth it writes to (relative names)."""
    from .train.loop import foreign_files
    from .writer import output_file, own_temporary

    def under(folder: Path, ok) -> list[str]:
        return [str(p.relative_to(out)) for p in sorted(folder.iterdir()) if not ok(p)] if folder.is_dir() else []

    stages, model, train = out / "stages", out / "model", out / "stages" / "train"
    return (under(out, lambda p: p.name in ("stages", "model") or own_temporary(p.name))
            + under(stages, lambda p: p.name in ("stats.json", "stats.json.tmp", "train") or own_temporary(p.name))
            + under(model, output_file)
            + [str((train / n).relative_to(out)) for n in foreign_files(train)])


def _similarity(base, instruct, path: Path, max_sigma: float | None, scope: str) -> dict:
    """The stats summary for (base, instruct), read back from ``path`` when an earlier run measured this pair."""
    from .compare import stats
    from .summary import THRESHOLD

    threshold = THRESHOLD if max_sigma is None else max_sigma
    key = {"base": str(base), "instruct": str(instruct), "threshold": threshold}
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in key} == key and "reshaped" in old:
            _check_shapes(base, instruct, old["reshaped"], scope)
            return old["summary"]
    report = stats(base, instruct, threshold=threshold)
    summary = report.summary.to_dict()
    reshaped = [[m.name, list(m.shape_a), list(m.shape_b)] for m in report.mismatched if tuple(m.shape_a) != tuple(m.shape_b)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**key, "summary": summary, "reshaped": reshaped}, indent=2, default=str) + "\n")
    tmp.replace(path)
    _check_shapes(base, instruct, reshaped, scope)
    return summary


def _check_shapes(base, instruct, reshaped: list, scope: str) -> None:
    """Refuse before training a pair whose grafted tensors differ in shape: the graft would fail only after the whole
    run. (Outside ``scope``, e.g. an embedding grown by a few tokens, instruct's own tensor is kept.)"""
    from .naming import in_scope

    reshaped = [r for r in reshaped if in_scope(r[0], tuple(r[2]), scope)]
    if reshaped:
        name, a, b = reshaped[0]
        raise ShadowgraftError(f"'{name}': base {tuple(a)} != instruct {tuple(b)} ({len(reshaped)} tensor(s) differ in "
                               f"shape), so {base} is not the base of {instruct} and nothing trained on it could be "
                               "grafted; check --base and --instruct")


def _check_reusable(done: dict, cfg, data_sha: str, train_dir: Path) -> None:
    if done.get("data_sha256") != data_sha:
        raise ShadowgraftError(f"{train_dir}: was trained on other data (sha256 {str(done.get('data_sha256'))[:12]}...); "
                               "pass --overwrite to retrain, or choose another --output")
    old, new = done.get("hyperparameters") or {}, json.loads(json.dumps(cfg.hyperparameters()))
    if old != new or done.get("model") != cfg.model:
        diff = next((k for k in new if old.get(k) != new[k]), "model")
        was = old.get(diff) if diff != "model" else done.get("model")
        now = new.get(diff) if diff != "model" else cfg.model
        raise ShadowgraftError(f"{train_dir}: was trained with {diff}={was!r}, not {now!r}; "
                               "pass --overwrite to retrain, or choose another --output")


def _examples(train_dir: Path) -> int | None:
    try:
        return json.loads((train_dir / "training_args.json").read_text()).get("examples")
    except (OSError, ValueError):
        return None
