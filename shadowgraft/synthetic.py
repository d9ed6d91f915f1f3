"""Small synthetic checkpoints with real Hugging Face names and layouts.

Used by the demo, the tests and the benchmarks, so that everything runs
offline. A "trio" is base, instruct = base + instruction-tuning change, and
tuned = base + fine-tuning change, like the models Shadow-FT works on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from .files import INDEX_NAME
from .shards import pack


@dataclass(frozen=True)
class Shape:
    """Sizes of a Llama-like decoder; defaults make a ~1 MB toy."""

    layers: int = 2
    hidden: int = 64
    intermediate: int = 160
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 2
    tie: bool = False
    bias: bool = False  # Qwen2-style q/k/v biases


def llama_tensors(s: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    hd = s.hidden // s.heads
    yield "model.embed_tokens.weight", (s.vocab, s.hidden)
    for i in range(s.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (s.hidden,)
        yield p + "self_attn.q_proj.weight", (s.heads * hd, s.hidden)
        yield p + "self_attn.k_proj.weight", (s.kv_heads * hd, s.hidden)
        yield p + "self_attn.v_proj.weight", (s.kv_heads * hd, s.hidden)
        if s.bias:
            yield p + "self_attn.q_proj.bias", (s.heads * hd,)
            yield p + "self_attn.k_proj.bias", (s.kv_heads * hd,)
            yield p + "self_attn.v_proj.bias", (s.kv_heads * hd,)
        yield p + "self_attn.o_proj.weight", (s.hidden, s.heads * hd)
        yield p + "post_attention_layernorm.weight", (s.hidden,)
        yield p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)
        yield p + "mlp.up_proj.weight", (s.intermediate, s.hidden)
        yield p + "mlp.down_proj.weight", (s.hidden, s.intermediate)
    yield "model.norm.weight", (s.hidden,)
    if not s.tie:
        yield "lm_head.weight", (s.vocab, s.hidden)


def bert_tensors(layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 100):
    yield "embeddings.word_embeddings.weight", (vocab, hidden)
    yield "embeddings.position_embeddings.weight", (64, hidden)
    yield "embeddings.LayerNorm.weight", (hidden,)
    yield "embeddings.LayerNorm.bias", (hidden,)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            yield p + m + ".weight", (hidden, hidden)
            yield p + m + ".bias", (hidden,)
        yield p + "attention.output.LayerNorm.weight", (hidden,)
        yield p + "attention.output.LayerNorm.bias", (hidden,)
        yield p + "intermediate.dense.weight", (intermediate, hidden)
        yield p + "intermediate.dense.bias", (intermediate,)
        yield p + "output.dense.weight", (hidden, intermediate)
        yield p + "output.dense.bias", (hidden,)
        yield p + "output.LayerNorm.weight", (hidden,)
        yield p + "output.LayerNorm.bias", (hidden,)
    yield "pooler.dense.weight", (hidden, hidden)
    yield "pooler.dense.bias", (hidden,)


def gpt2_tensors(layers: int = 2, hidden: int = 32, vocab: int = 100):
    yield "wte.weight", (vocab, hidden)
    yield "wpe.weight", (64, hidden)
    for i in range(layers):
        p = f"h.{i}."
        yield p + "ln_1.weight", (hidden,)
        yield p + "ln_1.bias", (hidden,)
        yield p + "attn.c_attn.weight", (hidden, 3 * hidden)
        yield p + "attn.c_attn.bias", (3 * hidden,)
        yield p + "attn.c_proj.weight", (hidden, hidden)
        yield p + "attn.c_proj.bias", (hidden,)
        yield p + "ln_2.weight", (hidden,)
        yield p + "ln_2.bias", (hidden,)
        yield p + "mlp.c_fc.weight", (hidden, 4 * hidden)
        yield p + "mlp.c_fc.bias", (4 * hidden,)
        yield p + "mlp.c_proj.weight", (4 * hidden, hidden)
        yield p + "mlp.c_proj.bias", (hidden,)
    yield "ln_f.weight", (hidden,)
    yield "ln_f.bias", (hidden,)


def write_checkpoint(
    folder: Path,
    names: list[tuple[str, tuple[int, ...]]],
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int | None = None,
    config: dict | None = None,
) -> Path:
    """Write tensors ``make(name, shape)`` as HF-style shards, one shard in memory at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    isz = torch.empty((), dtype=dtype).element_size()
    packed = pack((((name, shape), isz * torch.Size(shape).numel()) for name, shape in names), shard_bytes or None)
    n = len(packed)
    wmap, total = {}, 0
    for file, group in packed:
        tensors = {name: make(name, shape).to(dtype).contiguous() for name, shape in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            wmap[name] = file
            total += t.numel() * t.element_size()
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": wmap}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _seed(name: str, salt: int) -> int:
    h = 0
    for ch in f"{salt}:{name}":
        h = (h * 131 + ord(ch)) % (2**31 - 1)
    return h


def randn(name: str, shape: tuple[int, ...], salt: int, scale: float = 0.02) -> torch.Tensor:
    """Deterministic per-(name, salt) normal values, so models can be rebuilt tensor by tensor."""
    g = torch.Generator().manual_seed(_seed(name, salt))
    if "norm" in name.lower() or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return scale * torch.randn(shape, generator=g)


def llama_config(s: Shape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": s.vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": s.tie,
        "attention_bias": s.bias,
        "torch_dtype": "bfloat16",
    }


def make_trio(
    root: Path,
    *,
    shape: Shape = Shape(),
    names: list[tuple[str, tuple[int, ...]]] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int | None = None,
    gap: float = 0.02,
    tune: float = 0.005,
    config: dict | None = None,
) -> dict[str, Path]:
    """Write base, instruct (base + ``gap`` relative change) and tuned (base + ``tune``) under ``root``.

    >>> paths = make_trio(Path("/tmp/trio"))            # doctest: +SKIP
    >>> sorted(paths)                                   # doctest: +SKIP
    ['base', 'instruct', 'tuned']
    """
    root = Path(root)
    names = list(names if names is not None else llama_tensors(shape))
    cfg = config if config is not None else (llama_config(shape) if names and names[0][0].startswith("model.") else {})

    def base(n, sh):
        return randn(n, sh, 0)

    def instruct(n, sh):
        b = base(n, sh)
        return b + gap * b.abs().mean() * randn(n, sh, 1, 1.0)

    def tuned(n, sh):
        b = base(n, sh)
        return b + tune * b.abs().mean() * randn(n, sh, 2, 1.0)

    out = {}
    for label, make in (("base", base), ("instruct", instruct), ("tuned", tuned)):
        out[label] = write_checkpoint(root / label, names, make, dtype=dtype, shard_bytes=shard_bytes, config=cfg)
    (out["instruct"] / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    (out["instruct"] / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"}))
    return out
