"""The training loop, in plain torch: AdamW, warmup + cosine, gradient accumulation, clipping.

One optimizer step consumes ``batch_size x grad_accum x world`` examples
(or preference pairs). The loss of a step is the mean over every unit of
those examples (assistant token for SFT, pair for DPO; see ``objective``),
whichever rank or micro-batch holds them, so one process and several give
the same gradients (up to float rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from ..errors import ShadowgraftError
from ..writer import check_output_path, listed, output_file, replacing
from . import dist as D
from . import objective as O
from . import state as S
from .config import TrainConfig
from .data import sha256_file
from .dpo import REFERENCE_NAME
from .model import (load_model, load_tokenizer, packing_isolated, require_extra, require_packed_masks, save_adapter,
                    save_full, write_json)
from .progress import TrainProgress

LOG_NAME = "train_log.jsonl"
ARGS_NAME = "training_args.json"
DONE_NAME = "train_result.json"  # written last: its presence means the run finished


@dataclass(frozen=True)
class TrainResult:
    """Where the trained weights are and how the run went."""

    output: Path
    steps: int
    start_step: int  # > 0 when resumed
    loss: float | None  # last logged loss
    seconds: float
    examples: int
    dropped: int


def cosine_lr(step: int, *, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``: linear warmup, then cosine to 0."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def step_examples(n: int, *, step: int, per_step: int, steps_per_epoch: int, seed: int) -> list[int]:
    """Indices of the examples optimizer step ``step`` uses, from a fixed per-epoch shuffle.

    The last step of an epoch is topped up from the start of the same
    shuffle, so no example is dropped and every rank gets full batches.
    """
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [perm[(k * per_step + j) % n] for j in range(per_step)]


def train(*, config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the result to ``config.output``.

    >>> train(config=TrainConfig(model="./base", data="math.jsonl", output="./base-lora", lora_rank=8))  # doctest: +SKIP
    """
    config.check()
    require_extra(lora=config.is_lora)
    if config.packing:
        require_packed_masks()
    d = D.setup(config.device)
    try:
        return _run(config, d, console if d.main and not config.quiet else None)
    finally:
        D.teardown(d)


def _check_output(cfg: TrainConfig) -> Path | None:
    """Check the output folder, changing nothing; returns the checkpoint to resume from (None for a fresh run)."""
    check_output_path(cfg.output, inputs=[cfg.model, cfg.data, cfg.chat_template_from])
    out = Path(cfg.output)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output's parent folder does not exist; create it first")
    busy = out.exists() and any(out.iterdir())
    ckpt = None
    if cfg.resume:
        if (out / DONE_NAME).is_file():
            raise ShadowgraftError(f"{out}: this run already finished; nothing to resume (pass --overwrite to train again)")
        ckpt = S.latest(out) if out.is_dir() else None
        if ckpt is None:
            raise ShadowgraftError(f"{out}: no checkpoint to resume from under {S.checkpoints_dir(out)}; "
                                   "run without --resume (and with --save-every N to make some)")
    elif busy and not cfg.overwrite:
        raise ShadowgraftError(f"{out}: already exists; pass --resume to continue it or --overwrite to start over")
    elif busy and not _is_run_args(out / ARGS_NAME):
        raise ShadowgraftError(f"{out}: is not a training run folder (no {ARGS_NAME} written by shadowgraft train), "
                               "so --overwrite will not delete it; choose another --output")
    elif busy:
        foreign = foreign_files(out)
        if foreign:
            raise ShadowgraftError(f"{out}: an earlier training run, but it also holds {listed(foreign)}, which shadowgraft "
                                   "did not write; --overwrite will not delete them: move them out first, or choose another "
                                   "--output")
    return ckpt


def _is_run_args(path: Path) -> bool:
    """``training_args.json`` as this command writes it (a file of that name from another tool is not a mark)."""
    try:
        args = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(args, dict) and {"model", "data_sha256", "hyperparameters"} <= args.keys()


def _ours(entry: Path) -> bool:
    """What a training run writes into its folder: logs and marks, checkpoints, the model or adapter with its files."""
    if entry.name in (ARGS_NAME, LOG_NAME, DONE_NAME, REFERENCE_NAME, ".final-tmp"):
        return True
    if entry.name == S.checkpoints_dir(entry.parent).name:
        return entry.is_dir() and not entry.is_symlink() and all(S.is_checkpoint_entry(p) for p in entry.iterdir())
    return output_file(entry)


def foreign_files(folder: Path) -> list[str]:
    """What in a training run's folder this command did not write (names relative to the folder)."""
    return [p.name for p in sorted(folder.iterdir()) if not _ours(p)] if folder.is_dir() else []


@contextmanager
def _claimed(cfg: TrainConfig, d: D.Dist):
    """Create the output folder for the block, once data and model have loaded. With ``--overwrite`` the
    earlier run is moved aside, not deleted, until this one has finished: a run that fails late (NaN, a
    refused value, Ctrl-C) puts it back, so a refused run never costs the previous one."""
    out = Path(os.path.realpath(cfg.output))  # through a link, the folder it names
    d.barrier()  # every rank has looked before rank 0 changes anything
    created = not out.exists()
    fresh = not cfg.resume and (created or not any(out.iterdir()))
    with replacing(out, enabled=cfg.overwrite and d.main):
        if d.main:
            out.mkdir(exist_ok=True)
        d.barrier()
        try:
            yield
        except BaseException:
            # A new run that failed before its first checkpoint leaves nothing to resume: its log and
            # arguments would only block the next run ("already exists").
            if d.main and fresh and out.is_dir() and S.latest(out) is None:
                for p in out.iterdir():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                if created:
                    out.rmdir()
            raise


def _run(cfg: TrainConfig, d: D.Dist, console: Console | None) -> TrainResult:
    t0 = time.perf_counter()
    ckpt = _check_output(cfg)
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed)
    tokenizer, template = load_tokenizer(cfg.model, cfg.chat_template_from)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    obj = O.make(cfg, tokenizer=tokenizer, template=template, pad_id=pad_id, d=d)
    if d.main and obj.dropped:
        # Even with --quiet: training on fewer records than the file holds is never silent.
        from ..display import err

        (console or err).print(f"[yellow]warning:[/] {obj.dropped} {obj.skipped} within --max-length {cfg.max_length} "
                               "and are skipped")

    model, stored = load_model(cfg, bf16=d.bf16, quiet=cfg.quiet or not d.main)
    if cfg.packing and not packing_isolated(model, list(obj.items[0].input_ids)):
        raise ShadowgraftError(f"{cfg.model}: --packing would let packed examples attend to each other (this model's "
                               "attention ignores position ids, e.g. ALiBi models); train without --packing")
    with _claimed(cfg, d):
        meta = S.read(ckpt) if ckpt is not None else None
        if ckpt is not None:
            S.load_weights(ckpt, model)
        model = D.wrap(model, d, lora=cfg.is_lora)
        torch.manual_seed(cfg.seed + d.rank)  # dropout streams differ per rank
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

        per_step = cfg.batch_size * cfg.grad_accum * d.world
        steps_per_epoch = math.ceil(len(obj.items) / per_step)
        total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
        warmup = math.ceil(cfg.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total=total, warmup=warmup))

        data_sha = sha256_file(cfg.data)
        origin = _origin(cfg, template)
        start = 0
        if ckpt is not None:
            _check_same_run(ckpt, meta, cfg, data_sha, d, origin)
            S.load_optimizer(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, d=d, meta=meta)
            start = meta["step"]
        log_path = out / LOG_NAME
        if d.main:
            write_json(out / ARGS_NAME, _args(cfg, data_sha, template, d, total, len(obj.items)))
            _truncate_log(log_path, start)
        d.barrier()

        model.train()
        obj.prepare(model, out=out, resumed=ckpt is not None, batch_size=cfg.batch_size)
        win = [0.0] * len(obj.fields)  # sums of the logged values over the window's units
        tok_sum = win_units = 0.0
        win_t, last_loss = time.perf_counter(), None
        with TrainProgress(total=total, start=start, console=console) as bar:
            for step in range(start, total):
                idx = step_examples(len(obj.items), step=step, per_step=per_step, steps_per_epoch=steps_per_epoch,
                                    seed=cfg.seed)
                micro = [idx[(m * d.world + d.rank) * cfg.batch_size:][: cfg.batch_size] for m in range(cfg.grad_accum)]
                mine = [i for mb in micro for i in mb]
                units, tokens = d.sum([obj.units(mine), obj.tokens(mine)])
                lr = scheduler.get_last_lr()[0]
                sums = torch.zeros(len(obj.fields), dtype=torch.float64, device=d.device)  # on device: one sync per step
                for m, mb in enumerate(micro):
                    with D.sync_grads(model, m == len(micro) - 1):
                        summed, values = obj.loss(model, mb)
                        # DDP and FSDP average gradients over ranks; scaling by the
                        # world size turns that into a mean over all units of the step.
                        (summed * (d.world / units)).backward()
                    sums += values
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                win = [w + s for w, s in zip(win, d.sum(sums.tolist()))]
                tok_sum, win_units = tok_sum + tokens, win_units + units
                done = step + 1
                if done % cfg.log_every == 0 or done == total:
                    now = time.perf_counter()
                    means = {f: w / win_units for f, w in zip(obj.fields, win)}
                    row = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": means.pop("loss"),
                           "lr": lr, "tokens_per_s": round(tok_sum / max(now - win_t, 1e-9), 1), **means}
                    last_loss = row["loss"]
                    if not math.isfinite(last_loss):
                        raise ShadowgraftError(f"loss became {last_loss} at step {done}; {_lower(cfg)}")
                    if d.main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    bar.update(row)
                    win = [0.0] * len(obj.fields)
                    tok_sum = win_units = 0.0
                    win_t = now
                if cfg.save_every and done % cfg.save_every == 0 and done < total:
                    S.save(out, step=done, model=model, optimizer=optimizer, scheduler=scheduler, d=d,
                           extra={"data_sha256": data_sha, "hyperparameters": cfg.hyperparameters(), **origin})

        _check_finite(model, d, total, cfg)
        _save_final(out, cfg, model, stored, tokenizer, template, d)
        result = TrainResult(out, total, start, last_loss, time.perf_counter() - t0, len(obj.items), obj.dropped)
        if d.main:
            write_json(out / DONE_NAME, {"steps": total, "start_step": start, "loss": last_loss,
                                         "seconds": round(result.seconds, 3), "data_sha256": data_sha,
                                         "hyperparameters": cfg.hyperparameters(), "model": cfg.model})
        d.barrier()
        return result


def _lower(cfg: TrainConfig) -> str:
    """What to lower when the numbers blow up: the step size, and DPO's beta, which scales the loss's logits."""
    return f"lower --lr (now {cfg.learning_rate:g})" + (f" or --beta (now {cfg.beta:g})" if cfg.objective == "dpo" else "")


def _check_finite(model, d: D.Dist, step: int, cfg: TrainConfig) -> None:
    """Refuse to save weights that became NaN/Inf: the logged loss is measured before the last update, so a
    run can end with a finite loss and broken weights."""
    def local(p):  # an FSDP parameter is a DTensor: look at this rank's shard only
        return p.to_local() if hasattr(p, "to_local") else p

    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(local(p.detach())).all())]
    everywhere = [n for names in d.gather(bad) for n in names]  # every rank's shard: all raise, none hangs
    if everywhere:
        raise ShadowgraftError(f"weights became NaN/Inf by step {step} ('{everywhere[0]}' and {len(set(everywhere)) - 1} more); "
                               f"nothing was saved: {_lower(cfg)}")


def _save_final(out: Path, cfg: TrainConfig, model, stored, tokenizer, template, d: D.Dist) -> None:
    """Write the trained weights into ``out`` (collective; rank 0 writes).

    Files are staged in a sibling folder and moved in with the weights index
    (or single weights file) last, so a reader never sees a partial model.
    """
    state = None if cfg.is_lora else S.full_state(model, d, set(stored))
    if d.main:
        stage = out / ".final-tmp"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        inner = D.unwrap(model)
        if cfg.is_lora:
            save_adapter(stage, model=inner, tokenizer=tokenizer, template=template)
        else:
            save_full(stage, model=inner, state=state, stored=stored, tokenizer=tokenizer, template=template,
                      max_shard_size=cfg.max_shard_size)
        last = {"model.safetensors.index.json", "model.safetensors", "adapter_model.safetensors"}
        for p in sorted(stage.iterdir(), key=lambda p: p.name in last):
            p.replace(out / p.name)
        stage.rmdir()
    d.barrier()


def _args(cfg: TrainConfig, data_sha: str, template, d: D.Dist, total: int, n: int) -> dict:
    return {"model": cfg.model, "data": str(cfg.data), "data_sha256": data_sha, "chat_template_from": cfg.chat_template_from,
            "has_chat_template": template is not None, "hyperparameters": cfg.hyperparameters(), "world_size": d.world,
            "total_steps": total, "examples": n}


def _origin(cfg: TrainConfig, template: str | None) -> dict:
    """What a resumed run must start from as the first did: the model (a local folder by its absolute path) and the
    chat template's text (by hash: the same --chat-template-from can hold another template by then)."""
    model = os.path.realpath(cfg.model) if Path(cfg.model).exists() else cfg.model
    return {"model": model, "template_sha256": None if template is None else hashlib.sha256(template.encode()).hexdigest()}


def _check_same_run(ckpt: Path, meta: dict, cfg: TrainConfig, data_sha: str, d: D.Dist, origin: dict) -> None:
    # Checkpoints from before these keys were recorded carry neither: nothing to compare.
    if "model" in meta and meta["model"] != origin["model"]:
        raise ShadowgraftError(f"{ckpt}: was trained from {meta['model']}, not {cfg.model}; resume with the same --model "
                               "or start over with --overwrite")
    if "template_sha256" in meta and meta["template_sha256"] != origin["template_sha256"]:
        raise ShadowgraftError(f"{ckpt}: was trained with another chat template than {cfg.chat_template_from or cfg.model} "
                               "gives now; resume with the same template or start over with --overwrite")
    if meta.get("data_sha256") != data_sha:
        raise ShadowgraftError(f"{ckpt}: was trained on different data than {cfg.data}; resume with the same file "
                               "or start over with --overwrite")
    if meta.get("hyperparameters") != json.loads(json.dumps(cfg.hyperparameters())):
        old, new = meta.get("hyperparameters") or {}, cfg.hyperparameters()
        diff = next((k for k in new if old.get(k) != new[k]), "?")
        raise ShadowgraftError(f"{ckpt}: was trained with {diff}={old.get(diff)!r}, not {new.get(diff)!r}; "
                               "resume with the same flags or start over with --overwrite")
    if meta.get("world_size") != d.world:
        raise ShadowgraftError(f"{ckpt}: was written by {meta.get('world_size')} process(es), not {d.world}; the data "
                               "order depends on it, so resume with the same --nproc-per-node")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))
