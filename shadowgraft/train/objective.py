"""What a training step minimises: the data it reads and the loss of one micro-batch.

The loop asks an objective for its items (examples or preference pairs, by
index), for how many units a micro-batch's loss is a sum over (target tokens
for SFT, pairs for DPO) and for the loss itself; a step's loss is that sum
divided by the step's units over all processes, so one process and several
agree. ``dpo.DPO`` is the other objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShadowgraftError
from .config import TrainConfig
from .data import IGNORE, Example, collate, encode, pack, read_records
from .dist import Dist


class SFT:
    """Next-token cross-entropy on the assistant tokens; a step's loss is the mean over its target tokens."""

    fields = ("loss",)  # train_log.jsonl values, each a mean over the units of the logging window
    skipped = "record(s) have no assistant token"

    def __init__(self, examples: list[Example], *, dropped: int, pad_id: int, d: Dist):
        self.items, self.dropped, self.pad_id, self.d = examples, dropped, pad_id, d

    def units(self, idx: list[int]) -> int:
        return sum(self.items[i].n_targets for i in idx)

    def tokens(self, idx: list[int]) -> int:
        return sum(len(self.items[i].input_ids) for i in idx)

    def prepare(self, model, **_) -> None:
        """Nothing to do before the first step (DPO computes its reference here)."""

    def loss(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of the micro-batch ``idx`` (to backpropagate) and the float64 sums of ``fields``."""
        batch = {k: v.to(self.d.device) for k, v in collate([self.items[i] for i in idx], pad_id=self.pad_id).items()}
        with self.d.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           position_ids=batch.get("position_ids"), use_cache=False).logits
        summed = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                 ignore_index=IGNORE, reduction="sum")
        return summed, summed.detach().double().reshape(1)


def make(cfg: TrainConfig, *, tokenizer, template: str | None, pad_id: int, d: Dist):
    """The objective ``cfg.objective`` names, with its data read and tokenized (before any model is loaded)."""
    if cfg.objective == "dpo":
        from .dpo import DPO
        from .prefs import encode_pairs, read_pairs

        pairs, dropped = encode_pairs(read_pairs(cfg.data), tokenizer=tokenizer, chat_template=template,
                                      max_length=cfg.max_length, path=cfg.data)
        if not pairs:
            raise ShadowgraftError(f"{cfg.data}: no pair has a response token within --max-length {cfg.max_length}; "
                                   "raise --max-length")
        return DPO(pairs, dropped=dropped, pad_id=pad_id, d=d, beta=cfg.beta, lora=cfg.is_lora)
    examples, dropped = encode(read_records(cfg.data), tokenizer=tokenizer, chat_template=template,
                               max_length=cfg.max_length, path=cfg.data)
    if not examples:
        raise ShadowgraftError(f"{cfg.data}: no record has an assistant token within --max-length {cfg.max_length}; "
                               "raise --max-length")
    if cfg.packing:
        examples = pack(examples, max_length=cfg.max_length)
    return SFT(examples, dropped=dropped, pad_id=pad_id, d=d)
