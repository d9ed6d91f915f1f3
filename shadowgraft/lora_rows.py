"""``alpha * scale * B @ A`` of a LoRA term, a block of the weight's rows at a time, from small factors read once."""

from __future__ import annotations

import torch

from .header import TensorInfo
from .plan import LoraTerm
from .stream import Reader


class LoraRows:
    """The low-rank change of LoRA-grafted weights, row block by row block, with the factors cached per tensor.

    >>> LoraRows(reader, torch.device("cpu")).rows(term, 0, 4096, torch.float32)   # doctest: +SKIP
    """

    def __init__(self, reader: Reader, device: torch.device):
        self.reader, self.device = reader, device
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # ((term, dtype), left, right)
        self._experts: dict[tuple, torch.Tensor] = {}  # (B, rows, ...) -> (E, rows, r): per-expert weights' B columns

    def rows(self, lo: LoraTerm, start: int, n: int, wd: torch.dtype) -> torch.Tensor:
        """``scale * (B @ A)`` for the weight's flat elements ``[start, start+n)`` (whole rows)."""
        cache = self._cache  # one reference: another worker may swap the cache meanwhile
        if cache is None or cache[0] != (lo, wd):
            # The factors are small (r x in, out x r): read them once per
            # tensor, upcast, fold the scale into B, and lay them out as
            # (groups, rows, r) @ (groups, r, cols) so each row block is a
            # matmul per group into a reused buffer. A group is one expert of
            # a fused (E, ., .) weight; every other weight is one group.
            left, right = self._factors(lo, wd)
            cache = self._cache = ((lo, wd), left, right)
        _, left, right = cache
        rows, cols = left.shape[1], right.shape[2]
        r0, r1 = start // cols, (start + n) // cols
        out = self.reader.work("lora", n, wd).view(r1 - r0, cols)
        for g in range(r0 // rows, -(-r1 // rows)) if r1 > r0 else ():
            lo_row, hi_row = max(r0, g * rows), min(r1, (g + 1) * rows)
            torch.mm(left[g, lo_row - g * rows:hi_row - g * rows], right[g], out=out[lo_row - r0:hi_row - r0])
        return out.view(-1)

    def _factors(self, lo: LoraTerm, wd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)``, (groups, rows, r) and (groups, r, cols), with ``left[g] @ right[g]`` the weight's rows of group g."""
        if lo.experts == 1 and lo.expert is None:
            a = self._factor(lo.a, wd)
            b = self._factor(lo.b, wd).mul_(lo.scale)
            # Weight stored (in, out): its row i is column i of B @ A.
            left, right = (a.T, b.T) if lo.transpose else (b, a)
            return left.contiguous()[None], right.contiguous()[None]
        e_n = lo.experts
        r = lo.a.shape[0] // e_n
        if lo.expert is None:
            # The fused (E, d1, d2) weight itself: PEFT's delta[e] is B_e @ A_e,
            # or its transpose for experts stored (E, in, out).
            a = self._factor(lo.a, wd).view(e_n, r, -1)
            b = self._factor(lo.b, wd).mul_(lo.scale).view(-1, r, e_n)
            if lo.transpose:
                return a.transpose(1, 2).contiguous(), b.permute(2, 1, 0).contiguous()
            return b.permute(2, 0, 1).contiguous(), a
        # One expert's weight in a file that stores them apart: only expert
        # e's rows of A are read; B's columns for every expert are gathered
        # once per module (and row range) and kept for the experts that follow.
        cols = lo.a.shape[1]
        x = self.reader.load("lora_factor", lo.a, lo.expert * r * cols, r * cols)
        right = x.to(self.device, wd, copy=True).view(1, r, cols)
        key = (lo.b, lo.rows, lo.scale, e_n, wd)
        left = self._experts.pop(key, None)
        if left is None:
            r0, r1 = lo.rows or (0, lo.b.shape[0])
            y = self.reader.load("lora_factor", lo.b, r0 * r * e_n, (r1 - r0) * r * e_n)
            left = y.to(self.device, wd, copy=True).mul_(lo.scale).view(r1 - r0, r, e_n).permute(2, 0, 1).contiguous()
            while len(self._experts) >= 4:  # gate, up and down halves of one layer's experts, interleaved by name
                self._experts.pop(next(iter(self._experts)))
        self._experts[key] = left
        return left[lo.expert][None], right

    def _factor(self, info: TensorInfo, wd: torch.dtype) -> torch.Tensor:
        x = self.reader.load("lora_factor", info, 0, info.numel)
        return x.to(self.device, wd, copy=True).view(info.shape)
