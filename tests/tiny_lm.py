"""Tiny offline causal LMs for the training tests: a Llama built from a config and a byte-level BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "what is two plus two? four.", "user assistant system",
    "add the numbers and answer with one word", "hello world, how are you today?", "0 1 2 3 4 5 6 7 8 9 + - = ?",
]


def tiny_tokenizer(folder: Path, *, chat_template: str | None = None):
    """A byte-level BPE tokenizer (~300 tokens) with ChatML special tokens, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module", name="tok")
def chatml_tokenizer(tmp_path_factory):
    """The tiny tokenizer with a ChatML template, once per test module."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), chat_template=CHATML)


def tiny_llama(folder: Path, *, vocab: int, seed: int = 0, tie: bool = False, dtype=torch.bfloat16, perturb_from=None,
               gap: float = 0.02, init_std: float = 0.2):
    """A 2-layer Llama (hidden 32) saved in ``dtype``; with ``perturb_from`` it is that model plus relative noise ``gap``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1,
                      initializer_range=init_std,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if perturb_from is not None:
        src = LlamaForCausalLM.from_pretrained(perturb_from, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for (n, p), (_, q) in zip(model.named_parameters(), src.named_parameters()):
                p.copy_(q + gap * q.abs().mean() * torch.randn(q.shape, generator=g))
    model.to(dtype).save_pretrained(folder)
    return folder


def tiny_pair(root: Path, *, tie: bool = False) -> dict[str, Path]:
    """Base (no chat template) and instruct (base + 2% change, ChatML template), sharing one tokenizer."""
    base, inst = root / "base", root / "instruct"
    tok = tiny_tokenizer(base)
    tiny_tokenizer(inst, chat_template=CHATML)
    tiny_llama(base, vocab=len(tok), tie=tie)
    tiny_llama(inst, vocab=len(tok), tie=tie, seed=7, perturb_from=base)
    return {"base": base, "instruct": inst}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int = 4) -> list[dict]:
    """Short chat records whose answers a tiny model can memorise in a few dozen steps."""
    qs = [("what is two plus two?", "four."), ("hello world", "how are you today?"),
          ("the quick brown fox", "jumps over the lazy dog"), ("add 3 and 4", "7")]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qs[:n]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny base/instruct pair and a small repeated Q&A data set, built once per test module."""
    root = tmp_path_factory.mktemp("lm")
    p = tiny_pair(root)
    p["data"] = write_jsonl(root / "qa.jsonl", qa_rows() * 4)
    return p


def pref_rows(n: int = 4) -> list[dict]:
    """Preference pairs on the Q&A prompts: the right answer chosen, a wrong one rejected."""
    rows = [("what is two plus two?", "four.", "five."), ("hello world", "how are you today?", "the lazy dog"),
            ("the quick brown fox", "jumps over the lazy dog", "is brown"), ("add 3 and 4", "7", "8"),
            ("what is 0 + 1?", "1", "0")]
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows[:n]]


def assert_same_weights(one: Path, two: Path, name: str) -> None:
    """Two training runs' saved weights agree: bf16 within 1 ulp, fp32 to 1e-4 relative."""
    from .conftest import load, ulp_distance

    wa, wb = load(one / name), load(two / name)
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].dtype == torch.bfloat16:
            assert int(ulp_distance(wb[k], wa[k].double()).max()) <= 1, k
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def torchrun_train(args: list[str]):
    """``shadowgraft train ARGS`` as two CPU processes under torchrun (gloo); fails the test when it fails."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --standalone: a free port each time (the fixed default, 29500, can still be held by the previous run).
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "shadowgraft.train", *args], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_line_error(read, path: Path, text: str, message: str) -> None:
    """``read(path)`` of a file whose third line is bad fails with ``path:3: message``, exactly."""
    from shadowgraft import ShadowgraftError

    path.write_text(text)
    with pytest.raises(ShadowgraftError) as e:
        read(path)
    assert str(e.value) == f"{path}:3: {message}"
