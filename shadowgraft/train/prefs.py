"""Preference data for DPO: JSONL pairs -> chosen and rejected token ids, labels on the response only.

Two shapes, detected per file (every line must share the first line's):

    {"prompt": "...", "chosen": "...", "rejected": "..."}                                        strings
    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", ...}]}   conversational

A string prompt becomes one user turn. Prompt and response are rendered with
the chat template, and only the response's tokens (the reply and its
end-of-turn marker) are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ShadowgraftError
from .data import Example, collate, encode_messages, json_object, messages, read_records

KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PrefRecord:
    """One parsed line: the prompt's messages and the two responses' (assistant) messages."""

    line: int
    kind: str  # strings or conversational
    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]
    rejected: tuple[dict, ...]


@dataclass(frozen=True)
class Pair:
    """Prompt + chosen and prompt + rejected as token ids; both start with the same prompt tokens."""

    chosen: Example
    rejected: Example

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def read_pairs(path: str | Path) -> list[PrefRecord]:
    """Parse a preference JSONL file, failing on the first malformed line or on a line in another shape.

    >>> read_pairs("prefs.jsonl")[0].kind        # doctest: +SKIP
    'strings'
    """
    out = read_records(path, parse=parse_pair)
    for r in out[1:]:
        if r.kind != out[0].kind:
            raise ShadowgraftError(f"{path}:{r.line}: a {r.kind} pair in a file of {out[0].kind} pairs (line "
                                   f"{out[0].line}); write every pair of a file in one shape")
    return out


def parse_pair(raw: str, *, path: Path, line: int) -> PrefRecord:
    where = f"{path}:{line}"
    obj = json_object(raw, where)
    if any(k not in obj for k in KEYS):
        keys = ", ".join(sorted(obj)) or "none"
        raise ShadowgraftError(f"{where}: not a preference pair (keys: {keys}); --objective dpo needs 'prompt', "
                               "'chosen' and 'rejected'")
    p, c, r = (obj[k] for k in KEYS)
    if all(isinstance(v, str) for v in (p, c, r)):
        kind = "strings"
        prompt = ({"role": "user", "content": p},)
        chosen, rejected = ({"role": "assistant", "content": c},), ({"role": "assistant", "content": r},)
    elif all(isinstance(v, list) for v in (p, c, r)):
        kind = "conversational"
        prompt = tuple(messages(p, where, "prompt"))
        chosen, rejected = _response(c, where, "chosen"), _response(r, where, "rejected")
    else:
        raise ShadowgraftError(f"{where}: 'prompt', 'chosen' and 'rejected' must be all strings or all message lists")
    for key, resp in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in resp):
            raise ShadowgraftError(f"{where}: '{key}' is empty; give both responses some text, or drop the line")
    if chosen == rejected:
        raise ShadowgraftError(f"{where}: 'chosen' and 'rejected' are the same, so the pair prefers nothing; "
                               "fix or drop the line")
    return PrefRecord(line, kind, prompt, chosen, rejected)


def _response(msgs, where: str, key: str) -> tuple[dict, ...]:
    out = messages(msgs, where, key)
    for i, m in enumerate(out):
        if m["role"] != "assistant":
            raise ShadowgraftError(f"{where}: '{key}' message {i} has role '{m['role']}'; a response holds "
                                   "assistant messages only (earlier turns belong in 'prompt')")
    return tuple(out)


def encode_pairs(records: Iterable[PrefRecord], *, tokenizer, chat_template: str | None, max_length: int,
                 path: str | Path = "data") -> tuple[list[Pair], int]:
    """Tokenize pairs; returns them and how many had no response token left within ``max_length`` (dropped).

    The prompt is tokenized alone, as at inference, so chosen and rejected
    begin with the same prompt tokens; truncation cuts from the end, so both
    keep the prompt's start and lose response tokens only.

    >>> pairs, dropped = encode_pairs(read_pairs("p.jsonl"), tokenizer=tok, chat_template=t, max_length=4096)  # doctest: +SKIP
    """
    out, dropped = [], 0
    for r in records:
        where = f"{path}:{r.line}"
        if chat_template is None:
            raise ShadowgraftError(f"{where}: preference pairs need a chat template, and the model's tokenizer has "
                                   "none; pass --chat-template-from INSTRUCT_MODEL")
        sides = []
        for resp in (r.chosen, r.rejected):
            ids, labels = encode_messages(r.prompt + resp, tokenizer=tokenizer, template=chat_template, where=where,
                                          train_from=len(r.prompt))
            sides.append(Example(tuple(ids[:max_length]), tuple(labels[:max_length])))
        if min(s.n_targets for s in sides) == 0:
            dropped += 1
        else:
            out.append(Pair(*sides))
    return out, dropped


def collate_pairs(pairs: list[Pair], *, pad_id: int):
    """One padded batch: the chosen sequences in rows ``0..n-1``, the rejected ones in rows ``n..2n-1``.

    One forward pass scores both sides, as the policy and the reference see the very same batch.
    """
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id=pad_id)
