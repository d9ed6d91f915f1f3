"""Training hyper-parameters: one frozen dataclass whose defaults are the paper's recipe."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ShadowgraftError

# The paper's learning rates: full fine-tuning moves every weight, so it needs
# a far smaller step than LoRA's freshly initialised low-rank factors.
FULL_LR = 1e-5
LORA_LR = 2e-4
OBJECTIVES = ("sft", "dpo")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; ``shadowgraft train`` flags map one to one onto fields.

    >>> TrainConfig(model="./base", data="math.jsonl", output="./base-lora", lora_rank=8).learning_rate
    0.0002
    """

    model: str
    data: str
    output: str
    # sft: next-token loss on the assistant replies; dpo: preference pairs,
    # the sigmoid loss against the starting model (the paper's DPO variant).
    objective: str = "sft"
    beta: float = 0.1  # DPO: how far the policy may move from the reference (larger: less)
    # The instruct model whose chat template formats the data, so base learns
    # in the very format instruct will be prompted with after the graft.
    chat_template_from: str | None = None
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float | None = None  # None: 2 x rank, as in the paper
    lora_dropout: float = 0.0
    lr: float | None = None  # None: FULL_LR or LORA_LR
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    # Per device; with grad_accum 16 this is the official runs' 32 sequences per step on one GPU.
    batch_size: int = 2
    grad_accum: int = 16
    max_length: int = 4096
    packing: bool = False
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    seed: int = 42
    log_every: int = 1
    save_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    max_shard_size: str | None = "5GB"
    quiet: bool = False

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return LORA_LR if self.is_lora else FULL_LR

    @property
    def alpha(self) -> float | None:
        if not self.is_lora:
            return None
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def check(self) -> None:
        """Raise ``ShadowgraftError`` naming the first flag with an impossible value."""
        positive = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum, "--max-length": self.max_length,
                    "--log-every": self.log_every}
        for flag, v in positive.items():
            if v < 1:
                raise ShadowgraftError(f"{flag} must be at least 1, got {v}")
        for flag, v in {"--lora-rank": self.lora_rank, "--max-steps": self.max_steps, "--save-every": self.save_every}.items():
            if v is not None and v < 1:
                raise ShadowgraftError(f"{flag} must be at least 1, got {v}")
        if self.objective not in OBJECTIVES:
            raise ShadowgraftError(f"unknown --objective '{self.objective}'; use {' or '.join(OBJECTIVES)}")
        if self.objective == "dpo" and not (self.beta > 0 and math.isfinite(self.beta)):
            raise ShadowgraftError(f"--beta must be a positive number, got {self.beta}")
        if self.objective == "dpo" and self.packing:
            raise ShadowgraftError("--packing is for --objective sft; DPO scores each chosen and rejected reply whole")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ShadowgraftError(f"--epochs must be a positive number, got {self.epochs}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ShadowgraftError(f"--lr must be a positive number, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ShadowgraftError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ShadowgraftError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for flag, v in {"--max-grad-norm": self.max_grad_norm, "--weight-decay": self.weight_decay}.items():
            if not (v >= 0 and math.isfinite(v)):  # NaN too: a NaN norm switches clipping off silently
                raise ShadowgraftError(f"{flag} must be a number >= 0, got {v}")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ShadowgraftError(f"--lora-alpha must be a positive number, got {self.lora_alpha} (0 would train nothing)")
        # Checked now, not when the weights are saved after the whole run.
        from ..shards import parse_size

        n = parse_size(self.max_shard_size)
        if n is not None and n <= 0:
            raise ShadowgraftError(f"--max-shard-size must be positive, got {self.max_shard_size}")
        if self.resume and self.overwrite:
            raise ShadowgraftError("--resume and --overwrite contradict each other; pass one")

    def hyperparameters(self) -> dict:
        """The fields that change what is learned (not where files go), with defaults resolved."""
        d = asdict(self)
        # Gradient checkpointing recomputes the same activations, so it changes speed and memory, not the result.
        for k in ("model", "data", "output", "resume", "overwrite", "quiet", "device", "max_shard_size", "log_every",
                  "save_every", "gradient_checkpointing"):
            d.pop(k)
        d.update(lr=self.learning_rate, lora_alpha=self.alpha, method="lora" if self.is_lora else "full")
        if not self.is_lora:
            d.pop("lora_dropout")
        if self.objective == "sft":
            # Left out so runs recorded before DPO existed still compare equal (resume, shadow-ft reuse).
            d.pop("objective")
            d.pop("beta")
        return d
