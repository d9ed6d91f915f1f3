"""Training data: JSONL records in the common shapes -> token ids with loss only on assistant tokens.

Accepted shapes, detected per line:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}   chat
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}     ShareGPT
    {"instruction": "...", "input": "...", "output": "..."}                                      Alpaca
    {"text": "..."}                                                                              plain text

Chat, ShareGPT and Alpaca records become one message list, formatted by a
chat template; plain text is trained on every token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ShadowgraftError

IGNORE = -100  # label value that cross_entropy skips
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers as the common exports spell them.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool",
}


@dataclass(frozen=True)
class Record:
    """One parsed line: a conversation (``messages``) or a plain ``text``."""

    line: int
    kind: str  # chat, sharegpt, alpaca or text
    messages: tuple[dict, ...] = ()
    text: str | None = None


@dataclass(frozen=True)
class Example:
    """Token ids and their labels (``IGNORE`` where no loss is taken), of equal length."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    # Set by ``pack``: positions restart at 0 where each packed example starts,
    # which is how transformers tells packed examples apart (no attention
    # across them). None: one example, positions 0..n-1.
    position_ids: tuple[int, ...] | None = None

    @property
    def n_targets(self) -> int:
        # Position 0 is never predicted: the loss shifts labels left by one.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_records(path: str | Path, *, parse=None) -> list:
    """Parse every non-blank line of a JSONL file with ``parse`` (default: ``parse_line``), failing on the first
    malformed one.

    >>> read_records("math.jsonl")[0].kind        # doctest: +SKIP
    'sharegpt'
    """
    parse = parse or parse_line
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    out = []
    with open(path, "rb") as f:
        for n, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM, as some editors write, is no content
            except UnicodeDecodeError as e:
                raise ShadowgraftError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                       "save the file as UTF-8") from None
            if raw.strip():
                out.append(parse(raw, path=path, line=n))
    if not out:
        raise ShadowgraftError(f"{path}: no records; write one JSON object per line")
    return out


def json_object(raw: str, where: str) -> dict:
    """One JSONL line as a dict, or the error naming the line."""
    try:
        obj = json.loads(raw.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ShadowgraftError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
    if not isinstance(obj, dict):
        raise ShadowgraftError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_line(raw: str, *, path: Path, line: int) -> Record:
    where = f"{path}:{line}"
    obj = json_object(raw, where)
    if "messages" in obj:
        msgs = _needs_assistant(messages(obj["messages"], where), where)
        return Record(line, "chat", _with_system(obj, msgs, where))
    if "conversations" in obj:
        return Record(line, "sharegpt", _with_system(obj, _sharegpt(obj["conversations"], where), where))
    if "instruction" in obj and "output" in obj:
        return Record(line, "alpaca", tuple(_alpaca(obj, where)))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ShadowgraftError(f"{where}: 'text' must be a non-empty string")
        return Record(line, "text", text=obj["text"])
    keys = ", ".join(sorted(obj)) or "none"
    if "chosen" in obj and "rejected" in obj:
        raise ShadowgraftError(f"{where}: a preference pair (keys: {keys}); train on pairs with --objective dpo")
    raise ShadowgraftError(f"{where}: unknown record shape (keys: {keys}); use 'messages', 'conversations', "
                           "'instruction'/'input'/'output' or 'text'")


def _str(v, where: str, what: str) -> str:
    if not isinstance(v, str):
        raise ShadowgraftError(f"{where}: {what} must be a string, got {type(v).__name__}")
    return v


def messages(msgs, where: str, key: str = "messages") -> list[dict]:
    """A checked list of ``{"role", "content"}`` messages; errors name the record's ``key``."""
    if not isinstance(msgs, list) or not msgs:
        raise ShadowgraftError(f"{where}: '{key}' must be a non-empty list of {{'role', 'content'}} objects")
    who = "message" if key == "messages" else f"'{key}' message"
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ShadowgraftError(f"{where}: {who} {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ShadowgraftError(f"{where}: {who} {i} has role '{m['role']}'; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _str(m["content"], where, f"{who} {i} content")})
    return out


def _sharegpt(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ShadowgraftError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ShadowgraftError(f"{where}: turn {i} needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise ShadowgraftError(f"{where}: turn {i} is from '{t['from']}'; use human, gpt, system or tool")
        out.append({"role": role, "content": _str(t["value"], where, f"turn {i} value")})
    return _needs_assistant(out, where)


def _alpaca(obj: dict, where: str) -> list[dict]:
    prompt = _str(obj["instruction"], where, "'instruction'")
    extra = _str(obj.get("input") or "", where, "'input'")
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    msgs = []
    if obj.get("system"):
        msgs.append({"role": "system", "content": _str(obj["system"], where, "'system'")})
    # LLaMA-Factory's Alpaca files carry earlier turns as [[question, answer], ...].
    for pair in obj.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ShadowgraftError(f"{where}: 'history' must be a list of [question, answer] pairs")
        msgs += [{"role": "user", "content": _str(pair[0], where, "history")},
                 {"role": "assistant", "content": _str(pair[1], where, "history")}]
    msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _str(obj["output"], where, "'output'")}]
    return msgs


def _with_system(obj: dict, msgs: list[dict], where: str) -> tuple[dict, ...]:
    if obj.get("system") and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": _str(obj["system"], where, "'system'")}, *msgs]
    return tuple(msgs)


def _needs_assistant(msgs: list[dict], where: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise ShadowgraftError(f"{where}: no assistant message, so nothing to learn from; add one or drop the line")
    first = next(m["role"] for m in msgs if m["role"] != "system")
    if first == "assistant":
        # Its reply would have no prompt to follow: the template's own header
        # (and any default system prompt) would be trained as if the model wrote it.
        raise ShadowgraftError(f"{where}: the conversation starts with an assistant message; "
                               "put the user turn it answers before it, or drop the line")
    return msgs


# -- tokenizing ---------------------------------------------------------------


def encode(records: Iterable[Record], *, tokenizer, chat_template: str | None, max_length: int,
           path: str | Path = "data") -> tuple[list[Example], int]:
    """Tokenize records; returns the examples and how many had no target left after truncation (dropped).

    >>> examples, dropped = encode(read_records("d.jsonl"), tokenizer=tok, chat_template=None, max_length=4096)  # doctest: +SKIP
    """
    out, dropped = [], 0
    for r in records:
        if r.text is not None:
            ids = list(tokenizer(r.text, add_special_tokens=True)["input_ids"])
            if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)
            labels = list(ids)
        else:
            if chat_template is None:
                raise ShadowgraftError(f"{path}:{r.line}: conversations need a chat template, and the model's tokenizer "
                                       "has none; pass --chat-template-from INSTRUCT_MODEL")
            ids, labels = encode_messages(r.messages, tokenizer=tokenizer, template=chat_template,
                                          where=f"{path}:{r.line}")
        ex = Example(tuple(ids[:max_length]), tuple(labels[:max_length]))
        if ex.n_targets == 0:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


def assistant_spans(messages: tuple[dict, ...] | list[dict], render, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply, end-of-turn marker included.

    A reply starts where the template's generation prompt for it ends, and
    ends where rendering the conversation up to and including it ends. Some
    templates render the last turn differently (e.g. an empty think block);
    then the reply is located by its content and the template's closing text.
    """
    text = render(list(messages), False)
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(list(messages[:i]), True)
        if not text.startswith(prompt) or len(prompt) < cursor:
            raise ShadowgraftError(f"{where}: the chat template renders the conversation before message {i} differently "
                                   "from the whole conversation, so assistant tokens cannot be located; use another template")
        start = len(prompt)
        upto = render(list(messages[: i + 1]), False)
        if text.startswith(upto):
            end = len(upto)
        else:
            at = text.find(m["content"], start)
            if at < 0:
                raise ShadowgraftError(f"{where}: assistant message {i} does not appear in the rendered conversation; "
                                       "the chat template rewrites it, use another template")
            end = at + len(m["content"])
            closing = upto[upto.rfind(m["content"]) + len(m["content"]):] if m["content"] else ""
            if closing and text.startswith(closing, end):
                end += len(closing)
        spans.append((start, end))
        cursor = end
    return text, spans


def encode_messages(msgs: tuple[dict, ...], *, tokenizer, template: str, where: str,
                    train_from: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation, and labels on the assistant replies from message ``train_from`` on."""
    def render(ms, gen):
        if not ms:
            return ""
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(ms, chat_template=template, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:  # a syntax error, or the template's own raise_exception on this record
            raise ShadowgraftError(f"{where}: the chat template failed on this record ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())}); fix the template (--chat-template-from) or the record") from None

    text, spans = assistant_spans(msgs, render, where)
    # Earlier replies (a DPO prompt's own turns) stay context: their spans are dropped, not scored.
    spans = spans[sum(1 for m in msgs[:train_from] if m["role"] == "assistant"):]
    # Each piece is tokenized on its own, as at inference time the prompt is
    # encoded alone and the reply is generated after it. The template writes
    # any BOS itself, so the tokenizer adds no special tokens.
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, train in ((text[pos:start], False), (text[start:end], True)):
            if piece:
                t = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                ids += t
                labels += t if train else [IGNORE] * len(t)
        pos = end
    return ids, labels


def pack(examples: list[Example], *, max_length: int) -> list[Example]:
    """Concatenate whole examples, in order, into rows of at most ``max_length`` tokens.

    Each example's positions restart at 0, so the model attends within an
    example only (transformers builds a block-diagonal causal mask from such
    position ids), and the first token of each packed example gets no label,
    so no example is trained to follow another.
    """
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            rows.append(Example(tuple(ids), tuple(labels), tuple(pos)))
            ids, labels, pos = [], [], []
        ids += ex.input_ids
        labels += [IGNORE, *ex.labels[1:]] if labels else ex.labels
        pos += range(len(ex.input_ids))
    if ids:
        rows.append(Example(tuple(ids), tuple(labels), tuple(pos)))
    return rows


def collate(examples: list[Example], *, pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors for one micro-batch.

    Packed rows get ``position_ids`` instead of an ``attention_mask``: the
    padding is a segment of its own (positions from 0 again), and as it comes
    after every real token, causal attention never reaches it.
    """
    import torch

    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    # Packed: position ids, padding a segment of its own; otherwise the mask of real tokens.
    key = "position_ids" if packed else "attention_mask"
    extra = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        if packed:
            extra[i, :k] = torch.tensor(e.position_ids) if e.position_ids is not None else torch.arange(k)
            extra[i, k:] = torch.arange(n - k)
        else:
            extra[i, :k] = 1
    return {"input_ids": ids, key: extra, "labels": labels}
