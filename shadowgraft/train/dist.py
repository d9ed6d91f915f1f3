"""One process or many under ``torchrun``: device choice, process group, and model wrapping.

LoRA trains a few million parameters, so every rank keeps a whole replica
and DDP averages gradients. Full fine-tuning shards parameters, gradients
and optimizer state with FSDP2 (``fully_shard``), one unit per decoder block.
On CPU the process group uses gloo, which is how the tests run two ranks.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..ending import threads_outlive_teardown
from ..errors import ShadowgraftError


@dataclass(frozen=True)
class Dist:
    """Where this process runs and who else trains with it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process started the process group, so it also ends it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def bf16(self) -> bool:
        # CPU bf16 matmuls are slow and lossy on most hosts; keep fp32 there.
        return self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        """A list with every rank's ``obj`` (pickled), in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def setup(device: str = "auto") -> Dist:
    """Read torchrun's environment, pick the device, and start the process group when there are several ranks."""
    if device not in ("auto", "cpu", "cuda"):
        raise ShadowgraftError(f"unknown device '{device}'; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ShadowgraftError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    owns = world > 1 and not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
        threads_outlive_teardown()
    return Dist(rank=rank, world=world, local_rank=local, device=dev, owns_group=owns)


def teardown(d: Dist) -> None:
    if d.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, *, lora: bool) -> torch.nn.Module:
    """Move ``model`` to the device and wrap it for data parallelism (DDP for LoRA, FSDP2 for full)."""
    if lora:
        model.to(d.device)
        if not d.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if not d.enabled:
        return model.to(device=d.device, dtype=torch.float32)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if d.bf16 else MixedPrecisionPolicy()
    # Cast to fp32 master weights one block at a time before it is sharded,
    # so no rank ever holds a whole fp32 copy of the model.
    for block in _blocks(model):
        block.to(torch.float32)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if not isinstance(p, DTensor):
            p.data = p.data.float()
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    # transformers lists the classes that must not be split across devices:
    # exactly the decoder blocks, which are the natural FSDP units.
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ShadowgraftError(f"{type(model).__name__}: cannot find its decoder blocks to shard; "
                               "train it with --lora-rank, or on one process")
    return blocks


def sync_grads(model: torch.nn.Module, on: bool):
    """A context in which backward reduces gradients across ranks only when ``on`` (the last micro-batch)."""
    if hasattr(model, "no_sync") and not on:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(on)
    return nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
