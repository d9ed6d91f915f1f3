"""Direct preference optimisation: the sigmoid loss against the starting model, on chosen / rejected pairs.

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

with log-probabilities summed over the response tokens only. The reference
is the model training starts from, and no second copy of it is held:

- LoRA: the same model with its adapters switched off (peft's
  ``disable_adapter``), one extra forward pass without gradients per micro-batch;
- full fine-tuning: the weights change, so the reference log-probabilities of
  every pair are computed in one pass before the first step and kept as two
  float64 numbers per pair (also written to ``OUT/reference_logps.json``,
  which ``--resume`` reads back, as the resumed weights are no longer the reference).

At step 0 the policy equals the reference, so every pair's loss is ln 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ShadowgraftError
from . import dist as D
from .data import IGNORE
from .dist import Dist
from .model import write_json
from .prefs import Pair, collate_pairs

REFERENCE_NAME = "reference_logps.json"


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(token) over the labelled tokens (float64; label ``IGNORE`` is skipped).

    >>> sequence_logps(torch.zeros(1, 3, 4), torch.tensor([[IGNORE, 1, 2]]))     # two tokens of p = 1/4
    tensor([-2.7726], dtype=torch.float64)
    """
    tgt = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt.flatten(), ignore_index=IGNORE, reduction="none")
    # Per-token values in float32 (the vocabulary-wide softmax), their sum in float64: a reply's log-probability
    # is a large number whose small differences between policy and reference are the signal.
    return -nll.view(tgt.shape).double().sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss, and the implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected (detached).

    >>> dpo_loss(*torch.zeros(4, 1), beta=0.1)[0]         # policy == reference: ln 2
    tensor([0.6931])
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


class DPO:
    """The DPO objective for the training loop: items are preference pairs, a step's loss is the mean over pairs."""

    fields = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
    skipped = "pair(s) have no response token"

    def __init__(self, pairs: list[Pair], *, dropped: int, pad_id: int, d: Dist, beta: float, lora: bool):
        self.items, self.dropped, self.pad_id, self.d = pairs, dropped, pad_id, d
        self.beta, self.lora = beta, lora
        self.reference: torch.Tensor | None = None  # (pairs, 2) float64 log-probs; full fine-tuning only

    def units(self, idx: list[int]) -> int:
        return len(idx)

    def tokens(self, idx: list[int]) -> int:
        return sum(self.items[i].n_tokens for i in idx)

    def loss(self, model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of the pairs ``idx`` (to backpropagate) and the float64 sums of ``fields``."""
        batch = self._batch(idx)
        with self.d.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        policy = sequence_logps(logits, batch["labels"]).view(2, len(idx))
        if self.lora:
            ref = self._adapters_off(model, batch).view(2, len(idx))
        else:
            ref = self.reference[idx].T.to(policy.device)
        losses, chosen, rejected = dpo_loss(policy[0], policy[1], ref[0], ref[1], beta=self.beta)
        sums = torch.stack([losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                            (chosen > rejected).double().sum()])
        return losses.sum(), sums

    def prepare(self, model, *, out: Path, resumed: bool, batch_size: int) -> None:
        """Full fine-tuning: compute the reference before the first step, or read it back when resuming (collective)."""
        if self.lora:
            return
        path = out / REFERENCE_NAME
        if resumed:
            self.reference = self._read(path)
            return
        self.reference = self._reference(model, batch_size=batch_size)
        if self.d.main:
            # One line: two numbers per pair, no indentation for a file that may list many thousands.
            write_json(path, {"pairs": len(self.items), "logps": self.reference.tolist()}, indent=None)

    def _batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.d.device) for k, v in collate_pairs([self.items[i] for i in idx], pad_id=self.pad_id).items()}

    def _adapters_off(self, model, batch) -> torch.Tensor:
        """Log-probs of the batch under the starting model: this very model with its LoRA adapters switched off."""
        inner = D.unwrap(model)  # not through DDP: no gradients, so nothing to synchronise
        was = inner.training
        inner.eval()  # the reference is deterministic: no dropout
        try:
            with torch.no_grad(), inner.disable_adapter(), self.d.autocast():
                logits = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        finally:
            inner.train(was)
        return sequence_logps(logits, batch["labels"])

    def _reference(self, model, *, batch_size: int) -> torch.Tensor:
        """Every pair's (chosen, rejected) log-probs under ``model`` as it is now; each rank scores a share."""
        n, d = len(self.items), self.d
        table = torch.zeros(n, 2, dtype=torch.float64)
        per_round = batch_size * d.world
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, n, per_round):
                    idx = [start + d.rank * batch_size + j for j in range(batch_size)]
                    # FSDP gathers weights in every forward, so all ranks run the same number of
                    # them: past the end a rank re-scores pair 0 and discards the result.
                    batch = self._batch([i if i < n else 0 for i in idx])
                    with d.autocast():
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       use_cache=False).logits
                    logps = sequence_logps(logits, batch["labels"]).view(2, batch_size).T.cpu()
                    for k, i in enumerate(idx):
                        if i < n:
                            table[i] = logps[k]
        finally:
            model.train()
        # Each entry was filled by exactly one rank (zeros elsewhere), so the sum is every rank's share.
        return torch.tensor(d.sum(table.flatten().tolist()), dtype=torch.float64).view(n, 2)

    def _read(self, path: Path) -> torch.Tensor:
        try:
            obj = json.loads(path.read_text())
            table = torch.tensor(obj["logps"], dtype=torch.float64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShadowgraftError(f"{path}: the reference log-probabilities of this run are unreadable ({e}); "
                                   "start over with --overwrite") from None
        if tuple(table.shape) != (len(self.items), 2):
            raise ShadowgraftError(f"{path}: does not hold one (chosen, rejected) pair of log-probabilities for each "
                                   f"of the {len(self.items)} pairs; start over with --overwrite")
        return table
