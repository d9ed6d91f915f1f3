"""Resumable training state: ``OUT/checkpoints/step-NNNNNNNN/``.

Each checkpoint holds the trainable weights in fp32 (``trainable.safetensors``),
the optimizer's moments (``optimizer.safetensors``), and ``state.json`` with
the step, scheduler, optimizer hyper-parameters and every rank's RNG state.
Everything is safetensors or JSON, so resuming never unpickles a file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import ShadowgraftError
from ..save import save_tensors
from ..writer import OutputDir, own_temporary
from .dist import Dist

_STEP = re.compile(r"^step-(\d+)$")
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def is_checkpoint_entry(p: Path) -> bool:
    """An entry of ``checkpoints/`` that ``save`` writes: a step folder holding only its three files (or a killed
    save's leftovers, which the next save clears)."""
    if own_temporary(p.name):
        return True
    return (bool(_STEP.match(p.name)) and p.is_dir() and not p.is_symlink()
            and all(q.name in CHECKPOINT_FILES and q.is_file() for q in p.iterdir()))


def latest(out: Path) -> Path | None:
    """The checkpoint with the highest step under ``out``, or None."""
    found = [(int(m.group(1)), p) for p in checkpoints_dir(out).glob("step-*")
             if (m := _STEP.match(p.name)) and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def full_state(model, d: Dist, names: set[str]) -> dict[str, torch.Tensor]:
    """Full (unsharded) values of ``names`` on rank 0; every rank must call it (it gathers under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=d.enabled))
    return {k: v for k, v in sd.items() if k in names}


def trainable_names(model) -> set[str]:
    from .dist import unwrap

    return {n for n, p in unwrap(model).named_parameters() if p.requires_grad}


def save(out: Path, *, step: int, model, optimizer, scheduler, d: Dist, extra: dict) -> Path:
    """Write a checkpoint for ``step`` (collective: call on every rank; rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = full_state(model, d, trainable_names(model))
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=d.enabled))
    rng = d.gather({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None})
    final = checkpoints_dir(out) / f"step-{step:08d}"
    if d.main:
        moments = {f"{fqn}::{key}": v for fqn, st in osd["state"].items() for key, v in st.items() if torch.is_tensor(v)}
        for r, s in enumerate(rng):
            moments[f"rng::cpu::{r}"] = s["cpu"]
            if s["cuda"] is not None:
                moments[f"rng::cuda::{r}"] = s["cuda"]
        checkpoints_dir(out).mkdir(parents=True, exist_ok=True)
        with OutputDir(final, overwrite=True, marker="state.json") as tmp:
            save_tensors(tmp, weights, metadata={"format": "pt"})
            (tmp / "model.safetensors").rename(tmp / "trainable.safetensors")
            save_tensors(tmp, moments, metadata={"format": "pt"})
            (tmp / "model.safetensors").rename(tmp / "optimizer.safetensors")
            state = {"step": step, "world_size": d.world, "scheduler": scheduler.state_dict(),
                     "param_groups": osd["param_groups"], **extra}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    d.barrier()
    return final


def read(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ShadowgraftError(f"{ckpt / 'state.json'}: unreadable ({e}); delete this checkpoint to resume from an earlier one") from None


def load_weights(ckpt: Path, model) -> None:
    """Copy the saved trainable weights into ``model`` (unwrapped, before it is sharded)."""
    params = dict(model.named_parameters())
    with Checkpoint.open(ckpt / "trainable.safetensors") as ck:
        missing = trainable_names(model) - set(ck.tensors)
        if missing:
            raise ShadowgraftError(f"{ckpt}: has no '{sorted(missing)[0]}'; it was written for another model or "
                                   "method (full vs LoRA), resume with the same flags or start over with --overwrite")
        with torch.no_grad():
            for name in ck.tensors:
                if name not in params or params[name].shape != ck[name].shape:
                    raise ShadowgraftError(f"{ckpt}: '{name}' does not fit this model; resume with the same --model "
                                           "and --lora-rank, or start over with --overwrite")
                # Keep the saved fp32 values even where the model was loaded in bf16.
                params[name].data = ck.view(name).clone()


def load_optimizer(ckpt: Path, *, model, optimizer, scheduler, d: Dist, meta: dict) -> None:
    """Restore optimizer moments, scheduler position and RNG streams (collective under torchrun)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    osd: dict = {}
    rng = None
    if d.main or not d.enabled:
        state: dict = {}
        with Checkpoint.open(ckpt / "optimizer.safetensors") as ck:
            for key in ck.tensors:
                if key.startswith("rng::"):
                    continue
                fqn, _, name = key.rpartition("::")
                state.setdefault(fqn, {})[name] = ck.view(key).clone()
        osd = {"state": state, "param_groups": meta["param_groups"]}
    with Checkpoint.open(ckpt / "optimizer.safetensors") as ck:
        key = f"rng::cpu::{d.rank}"
        if key in ck:
            rng = ck.view(key).clone()
        cuda_key = f"rng::cuda::{d.rank}"
        if d.device.type == "cuda" and cuda_key in ck:
            torch.cuda.set_rng_state(ck.view(cuda_key).clone(), d.device)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=osd, options=opts)
    scheduler.load_state_dict(meta["scheduler"])
    if rng is not None:
        torch.set_rng_state(rng)
