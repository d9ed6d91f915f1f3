"""Low-rank "shadow adapters": truncated SVD of a delta, written as a standard PEFT LoRA adapter.

A full fine-tuning delta ``D = W_tuned - W_base`` is split as ``D ~ B @ A``
with ``B = U sqrt(S)`` (out x k) and ``A = sqrt(S) V^T`` (k x in), the best
rank-k approximation in Frobenius norm (Eckart-Young). Small matrices get
an exact ``torch.linalg.svd``; large ones ``torch.svd_lowrank`` (randomized
range finder with power iterations), which is exact to rounding whenever
the delta's rank is below the sketch size and otherwise costs O(m n k)
instead of O(m n min(m, n)).

The adapter uses ``lora_alpha = r`` for every module, so PEFT's scale is 1
and ``B @ A`` is the delta itself.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import copy_range, write_all
from .header import DTYPE_BITS, TensorInfo
from .plan import Item
from .shards import Shard
from .writer import shard_header

# At or below this many rows/columns a full SVD is cheap and exact (256 x 1024
# fp32: ~0.2 s on two cores, while 1024 x 2816 takes ~6 s against ~0.3 s
# randomized).
EXACT_MAX = 256
# svd_lowrank sketch for rank k: 2k + 10 columns, 4 power iterations. On a
# 2816 x 1024 delta with a power-law spectrum this keeps >99.8% of the optimal
# rank-16/64 energy; on pure noise (flat spectrum, the worst case) ~94-97%.
# The energy reported is always what the stored factors really keep.
OVERSAMPLE = 10
NITER = 4


def _sketch(k: int) -> int:
    return 2 * k + OVERSAMPLE
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# transformers model types whose linear layers are GPT-2 Conv1D (weight stored (in, out)).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


@dataclass(frozen=True)
class Factors:
    """``b @ a`` approximates the matrix it came from; ``energy`` is the fraction of its squared Frobenius norm kept."""

    a: torch.Tensor  # (k, in)
    b: torch.Tensor  # (out, k)
    energy: float
    rel_error: float  # ||M - b @ a||_F / ||M||_F, measured
    method: str  # "exact" or "randomized"

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def factorize(m: torch.Tensor, *, rank: int | None = None, energy: float | None = None, seed: int = 0) -> Factors | None:
    """Truncated SVD of a 2-D float tensor, at a fixed ``rank`` or the smallest rank keeping ``energy``.

    With both, ``rank`` caps the rank that ``energy`` asks for. Returns None for an all-zero matrix.

    >>> f = factorize(torch.ones(6, 4), rank=2)
    >>> f.a.shape, f.b.shape, round(f.energy, 6), f.rel_error < 1e-6
    (torch.Size([2, 4]), torch.Size([6, 2]), 1.0, True)
    """
    if rank is None and energy is None:
        raise ValueError("give rank, energy or both")
    m = m.float()
    # torch's fp32 reductions sum in a cascade, accurate to ~1e-7 relative,
    # without an fp64 copy of a possibly huge matrix.
    total = float(torch.linalg.vector_norm(m)) ** 2
    if total == 0.0:
        return None
    kmax = min(m.shape)
    cap = min(rank, kmax) if rank is not None else kmax
    u, s, v, method = _svd(m, cap, energy, total, seed)
    s2 = s.double().square()
    if energy is not None:
        # Smallest k whose kept energy reaches the target (never past cap).
        cum = torch.cumsum(s2, 0) / total
        k = min(int((cum < energy - 1e-12).sum()) + 1, cap, len(s))
    else:
        k = min(cap, len(s))
    root = s[:k].sqrt()
    b = (u[:, :k] * root).contiguous()
    a = (root[:, None] * v[:, :k].T).contiguous()
    resid = torch.addmm(m, b, a, alpha=-1.0)
    err = float(torch.linalg.vector_norm(resid)) / total ** 0.5
    return Factors(a, b, float(s2[:k].sum() / total), err, method)


def _svd(m: torch.Tensor, cap: int, energy: float | None, total: float, seed: int):
    kmax = min(m.shape)
    if kmax <= EXACT_MAX or (energy is None and _sketch(cap) >= kmax // 2):
        return (*_exact(m), "exact")
    # Randomized: with a fixed rank one sketch; with an energy target grow
    # the sketch until the kept energy reaches it, then stop. Past half the
    # dimension the full SVD is cheaper.
    k = cap if energy is None else min(cap, 32)
    while True:
        q = _sketch(k)
        if q >= kmax // 2:
            return (*_exact(m), "exact")
        cuda = [m.device.index if m.device.index is not None else torch.cuda.current_device()] if m.device.type == "cuda" else []
        # A fixed seed, without touching the caller's random state, so the adapter is reproducible.
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(m, q=q, niter=NITER)
        if energy is None or float(s[:k].double().square().sum()) / total >= energy or k >= cap:
            # Only the first k triplets are trusted; the rest of the sketch is oversampling.
            return u[:, :k], s[:k], v[:, :k], "randomized"
        k = min(2 * k, cap)


def _exact(m: torch.Tensor):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh.T


def is_conv1d(module: str, model_type: str | None) -> bool:
    """Whether transformers builds ``module`` as a GPT-2 ``Conv1D`` (weight stored (in, out)).

    Decided by the checkpoint's ``config.json`` model type; without one, by GPT-2's module names.

    >>> is_conv1d("h.0.attn.c_attn", "gpt2"), is_conv1d("transformer.h.0.attn.c_attn", "gpt_bigcode")
    (True, False)
    """
    if model_type:
        return model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_LEAVES
    return module.rsplit(".", 1)[-1] in CONV1D_LEAVES


class AdapterWriter:
    """Builds ``adapter_model.safetensors`` in ``folder`` one module at a time, in bounded memory.

    Factor bytes go to a spool file as they are made (their ranks are not
    known in advance), then the header is written and the bytes copied after
    it by the kernel.

    >>> w = AdapterWriter(Path(tmp), dtype="F32")                      # doctest: +SKIP
    >>> w.add("model.layers.0.self_attn.q_proj", f, embedding=False)   # doctest: +SKIP
    >>> w.finish(config)                                               # doctest: +SKIP
    """

    def __init__(self, folder: Path, *, dtype: str = "F32"):
        from .dtypes import torch_dtype

        self.folder = Path(folder)
        self.dtype = dtype
        self._torch = torch_dtype(dtype)
        self._spool = self.folder / f".{WEIGHTS_NAME}.spool"
        self._fd = os.open(self._spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._items: list[Item] = []
        self._off = 0
        self.ranks: dict[str, int] = {}
        self.embeddings: set[str] = set()

    def add(self, module: str, f: Factors, *, embedding: bool) -> None:
        """Store ``f`` as ``module``'s factors: ``lora_A``/``lora_B``, or ``lora_embedding_A``/``B`` for an embedding."""
        if embedding:
            keys = (f"base_model.model.{module}.lora_embedding_A", f"base_model.model.{module}.lora_embedding_B")
            self.embeddings.add(module)
        else:
            keys = (f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight")
        for key, t in zip(keys, (f.a, f.b)):
            data = t.detach().to("cpu", self._torch).contiguous()
            raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
            write_all(self._fd, raw)
            n = data.numel() * DTYPE_BITS[self.dtype] // 8
            info = TensorInfo(key, self.dtype, tuple(data.shape), self._spool, self._off, self._off + n)
            self._items.append(Item(key, "copy", self.dtype, info))
            self._off += n
        self.ranks[module] = f.rank

    @property
    def nbytes(self) -> int:
        return self._off

    def finish(self, config: dict) -> None:
        """Write the safetensors file (header, then the spooled bytes) and ``adapter_config.json``."""
        os.close(self._fd)
        self._fd = -1
        shard = Shard(WEIGHTS_NAME, tuple(self._items))
        out = os.open(self.folder / WEIGHTS_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(out, shard_header(shard))
            src = os.open(self._spool, os.O_RDONLY)
            try:
                copy_range(src, 0, out, self._off)
            finally:
                os.close(src)
        finally:
            os.close(out)
        self._spool.unlink()
        (self.folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def adapter_config(*, ranks: dict[str, int], modules_in_model: set[str], fan_in_fan_out: bool,
                   base_model: str | None, task_type: str | None) -> dict:
    """A PEFT ``LoraConfig`` dict whose scale is 1 for every module (``lora_alpha == r``).

    ``target_modules`` is the short list of leaf names (``q_proj``, ...) when
    those select exactly the adapted modules in the model, else the full
    module names; ranks that differ from the common one go to
    ``rank_pattern`` / ``alpha_pattern`` by full module name.

    >>> c = adapter_config(ranks={"m.l.0.q": 4, "m.l.1.q": 2}, modules_in_model={"m.l.0.q", "m.l.1.q", "m.l.0.k"},
    ...                    fan_in_fan_out=False, base_model=None, task_type=None)
    >>> c["target_modules"], c["r"], c["rank_pattern"], c["alpha_pattern"]
    (['q'], 4, {'m.l.1.q': 2}, {'m.l.1.q': 2})
    """
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    leaves = {m.rsplit(".", 1)[-1] for m in ranks}
    if {m for m in modules_in_model if m.rsplit(".", 1)[-1] in leaves} == set(ranks):
        targets = sorted(leaves)
    else:
        targets = sorted(ranks)
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "target_modules": targets,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }
