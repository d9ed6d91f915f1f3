"""Write in-memory tensors as a Hugging Face style safetensors checkpoint, through shadowgraft's writer.

Used where a model lives in memory (the training loop); grafts stream
from disk through ``engine`` instead. Tensors are converted and written one
at a time, so the only extra memory is one tensor in its output dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .dtypes import code_of, torch_dtype
from .header import TensorInfo
from .plan import Item
from .shards import Shard, aligned, pack, parse_size
from .writer import shard_header, write_index


def plan_tensors(tensors: Mapping[str, torch.Tensor], *, max_shard_size: str | int | None = None,
                 dtypes: Mapping[str, torch.dtype] | None = None) -> list[Shard]:
    """Group tensors, in order, into shards of at most ``max_shard_size`` bytes (one shard when None).

    Names follow Hugging Face: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors``.
    Inside a shard wider dtypes come first so every tensor stays aligned to its element size.
    ``dtypes`` gives the output dtype of some tensors (default: their own).
    """
    items = []
    for name, t in tensors.items():
        dt = (dtypes or {}).get(name, t.dtype)
        code = code_of(dt)
        nbytes = t.numel() * torch.empty((), dtype=dt).element_size()
        # The writer only needs name, dtype and shape; this Item has no source file.
        items.append(Item(name, "copy", code, TensorInfo(name, code, tuple(t.shape), Path(name), 0, nbytes)))
    return [aligned(f, g) for f, g in pack(((it, it.nbytes) for it in items), parse_size(max_shard_size))]


def save_tensors(folder: str | Path, tensors: Mapping[str, torch.Tensor], *, max_shard_size: str | int | None = None,
                 dtypes: Mapping[str, torch.dtype] | None = None, metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` into ``folder`` (which must exist) as safetensors shards plus an index when sharded.

    ``dtypes`` converts some tensors on the way out, one at a time (e.g.
    fp32 master weights back to the model's bf16). Returns the file names written. Tensors that share storage must be
    dropped by the caller first (as ``save_pretrained`` drops a tied lm_head).

    >>> save_tensors(tmp, {"w": torch.ones(2, 2)}, max_shard_size="5GB")     # doctest: +SKIP
    ['model.safetensors']
    """
    folder = Path(folder)
    shards = plan_tensors(tensors, max_shard_size=max_shard_size, dtypes=dtypes)
    for shard in shards:
        with open(folder / shard.file, "wb") as f:
            f.write(shard_header(shard, metadata or {"format": "pt"}))
            for it in shard.items:
                t = tensors[it.name].detach().to(device="cpu", dtype=torch_dtype(it.dtype)).contiguous()
                if t.numel():
                    # A byte view writes any dtype (bf16 included) without a numpy equivalent.
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    index = write_index(folder, shards)
    return [s.file for s in shards] + ([index] if index else [])
