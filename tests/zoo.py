"""An architecture zoo: tiny random models built with transformers' own classes and saved with ``save_pretrained``.

Names, tied weights and file layout are then exactly what transformers
writes (and what the Hub holds), not our guess of them. Each family gives a
trio: base (random), instruct and tuned (base plus independent noise on
every floating tensor, applied to the saved files tensor by tensor, so the
names and the set of stored tensors stay transformers' own).

What transformers 5.24 writes, as observed (``save_pretrained`` reverts its
load-time conversions, so the files hold the Hub layout):
- Qwen3-MoE, Mixtral and DeepSeek-V3 keep one 2-D tensor per expert
  (``mlp.experts.N.gate_proj.weight``, ``block_sparse_moe.experts.N.w1.weight``);
- Llama 4 stores fused 3-D experts without ``.weight``
  (``feed_forward.experts.gate_up_proj``, ``feed_forward.experts.down_proj``);
- GPT-2 Conv1D weights are stored (in, out);
- tied embeddings (Gemma 3) store only ``embed_tokens``, no ``lm_head``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Relative noise of instruct and tuned against base: small, like real pairs.
GAP = 0.02


@dataclass(frozen=True)
class Family:
    """One zoo entry: how to build its config and which transformers class loads it."""

    name: str
    cls: str  # transformers class name, e.g. "LlamaForCausalLM"
    config: Callable[[], object]
    multimodal: bool = False
    # For multimodal families: the text-only CausalLM class a user would tune
    # on the language model alone (transformers' own class for text_config).
    text_cls: str | None = None


def _tf():
    import transformers

    return transformers


def _llama():
    return _tf().LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64)


def _qwen2():
    return _tf().Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _qwen3():
    return _tf().Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)


def _gemma3_text_kw() -> dict:
    return dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=16)


def _gemma3_text():
    return _tf().Gemma3TextConfig(**_gemma3_text_kw())


def _phi3():
    return _tf().Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=64, original_max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _gpt2():
    return _tf().GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def _qwen3_moe():
    return _tf().Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                tie_word_embeddings=False)


def _mixtral():
    return _tf().MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=64)


def _llama4_text():
    return _tf().Llama4TextConfig(vocab_size=96, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                  max_position_embeddings=64, attention_chunk_size=16, pad_token_id=0)


def _deepseek_v3():
    # Layer 0 dense (first_k_dense_replace=1), layer 1 MoE with a shared expert; MLA with a q LoRA.
    return _tf().DeepseekV3Config(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16,
                                  q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                                  first_k_dense_replace=1, max_position_embeddings=64, num_mtp_layers=0)


def _gemma3_mm():
    tf = _tf()
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return tf.Gemma3Config(text_config=_gemma3_text_kw(), vision_config=vision, mm_tokens_per_image=4,
                           boi_token_index=90, eoi_token_index=91, image_token_index=92)


def _qwen25_vl():
    tf = _tf()
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=4,
                  window_size=16, fullatt_block_indexes=[1])
    return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=92, video_token_id=93,
                               vision_start_token_id=90, vision_end_token_id=91)


def _llava():
    tf = _tf()
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=32)
    text = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=92, image_seq_length=16)


FAMILIES = {f.name: f for f in [
    Family("llama", "LlamaForCausalLM", _llama),
    Family("qwen2", "Qwen2ForCausalLM", _qwen2),
    Family("qwen3", "Qwen3ForCausalLM", _qwen3),
    Family("gemma3-text", "Gemma3ForCausalLM", _gemma3_text),
    Family("phi3", "Phi3ForCausalLM", _phi3),
    Family("gpt2", "GPT2LMHeadModel", _gpt2),
    Family("qwen3-moe", "Qwen3MoeForCausalLM", _qwen3_moe),
    Family("mixtral", "MixtralForCausalLM", _mixtral),
    Family("llama4-text", "Llama4ForCausalLM", _llama4_text),
    Family("deepseek-v3", "DeepseekV3ForCausalLM", _deepseek_v3),
    Family("gemma3", "Gemma3ForConditionalGeneration", _gemma3_mm, multimodal=True, text_cls="Gemma3ForCausalLM"),
    Family("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", _qwen25_vl, multimodal=True, text_cls="Qwen2ForCausalLM"),
    Family("llava", "LlavaForConditionalGeneration", _llava, multimodal=True, text_cls="LlamaForCausalLM"),
]}


def model_class(name: str):
    return getattr(_tf(), name)


def build_base(fam: Family, folder: Path, *, seed: int = 0) -> Path:
    """Random weights from ``fam``'s config, saved by transformers in bf16."""
    torch.manual_seed(seed)
    model = model_class(fam.cls)(fam.config())
    with torch.no_grad():
        for p in model.parameters():
            # Biases start at zero; relative noise on zero is no pair a user would graft.
            if p.is_floating_point() and not p.any():
                p.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def perturbed(src: Path, dst: Path, *, seed: int, gap: float = GAP) -> Path:
    """A copy of checkpoint folder ``src`` with relative noise on every floating tensor, file by file.

    Names, dtypes, shapes, file split and side files stay exactly as ``src``
    has them, so the copy is what transformers wrote with other values.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(src.iterdir()):
        if f.suffix != ".safetensors":
            if f.is_file():
                (dst / f.name).write_bytes(f.read_bytes())
            continue
        out = {}
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata()
            for k in fh.keys():
                t = fh.get_tensor(k)
                if t.is_floating_point():
                    x = t.double()
                    scale = float(x.abs().mean()) or 1.0
                    t = (x + gap * scale * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(t.dtype)
                out[k] = t.contiguous()
        save_file(out, str(dst / f.name), metadata=meta)
    return dst


def build_trio(fam: Family, root: Path) -> dict[str, Path]:
    """base / instruct / tuned folders of ``fam`` under ``root``."""
    base = build_base(fam, root / "base")
    return {"base": base, "instruct": perturbed(base, root / "instruct", seed=1),
            "tuned": perturbed(base, root / "tuned", seed=2)}


def config_dict(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def text_model(fam: Family, folder: Path, *, dtype=torch.bfloat16):
    """The language model of ``folder`` as a text-only CausalLM, the way a user tunes a multimodal model cheaply.

    For a text family this is the model itself. For a multimodal one it is
    transformers' own CausalLM class built from ``text_config``, holding the
    multimodal model's decoder and lm_head weights.
    """
    mm = model_class(fam.cls).from_pretrained(folder, dtype=dtype)
    if not fam.multimodal:
        return mm
    tf = _tf()
    text_cfg = mm.config.text_config
    if fam.text_cls == "Qwen2ForCausalLM":
        # Qwen2.5-VL's decoder is Qwen2's; its text config only adds the multimodal rope sections.
        kw = {k: v for k, v in text_cfg.to_dict().items() if k not in ("model_type", "architectures")}
        text_cfg = tf.Qwen2Config(**kw)
    text = model_class(fam.text_cls)(text_cfg).to(dtype)
    text.model.load_state_dict(mm.model.language_model.state_dict())
    if not text.config.tie_word_embeddings:
        text.lm_head.load_state_dict(mm.lm_head.state_dict())
    return text


def text_only(fam: Family, src: Path, dst: Path) -> Path:
    """``text_model`` of ``src`` saved by transformers: names as a text-only fine-tune writes them."""
    text_model(fam, src).save_pretrained(dst)
    return dst


def scope_table(root: Path) -> str:
    """The README's family table: per family, what ``apply`` grafts by default and what it copies.

    Run ``python -m tests.zoo`` to regenerate it.
    """
    import re

    from shadowgraft.checkpoint import Checkpoint
    from shadowgraft.plan import select

    def short(names: list[str]) -> str:
        # Grouped by block prefix (one per tower); block and expert indices collapse to N and E.
        groups: dict[str, list[str]] = {}
        for n in names:
            m = re.match(r"^(.*?(?:layers|layer|h|blocks|block)\.)\d+\.(.*)$", n)
            head, rest = (m.group(1) + "N.", m.group(2)) if m else ("", n)
            rest = re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.E.", rest)
            if rest not in groups.setdefault(head, []):
                groups[head].append(rest)
        return "<br>".join(f"`{h}`: {', '.join(sorted(v))}" for h, v in groups.items())

    rows = ["| family (class) | grafted by default | copied (inside blocks) |", "|---|---|---|"]
    for name, fam in FAMILIES.items():
        folder = build_base(fam, root / name)
        with Checkpoint.open(folder) as ck:
            pick = select(ck, scope="linear")
            from shadowgraft.naming import block_index

            grafted = [n for n in ck.tensors if pick(n)]
            copied = [n for n in ck.tensors if not pick(n) and block_index(n) is not None]
        rows.append(f"| {name} (`{fam.cls}`) | {short(grafted)} | {short(copied)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    print(scope_table(Path(tempfile.mkdtemp())))
