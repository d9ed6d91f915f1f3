"""Structural scope rules over real architecture names."""

import pytest

from shadowgraft.naming import block_index, family, in_scope, is_linear, module_kind, tower, weight_names

LLAMA_LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("name,idx", [
    ("model.layers.12.mlp.up_proj.weight", 12),
    ("encoder.layer.3.attention.self.query.weight", 3),
    ("transformer.h.0.attn.c_attn.weight", 0),
    ("h.7.mlp.c_fc.bias", 7),
    ("encoder.block.2.layer.0.SelfAttention.q.weight", 2),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.norm.weight", None),
])
def test_block_index(name, idx):
    assert block_index(name) == idx


@pytest.mark.parametrize("name,kind", [
    ("model.layers.0.self_attn.q_proj.weight", "q"),
    ("model.layers.0.self_attn.o_proj.weight", "o"),
    ("model.layers.0.mlp.gate_proj.weight", "gate"),
    ("model.layers.0.mlp.down_proj.weight", "down"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.layers.0.self_attn.q_norm.weight", "norm"),
    ("encoder.layer.0.attention.self.key.weight", "k"),
    ("encoder.layer.0.attention.output.dense.weight", "o"),
    ("encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
    ("encoder.layer.0.intermediate.dense.weight", "up"),
    ("encoder.layer.0.output.dense.weight", "down"),
    ("h.0.attn.c_attn.weight", "qkv"),
    ("h.0.attn.c_proj.weight", "o"),
    ("h.0.mlp.c_proj.weight", "down"),
    ("h.0.ln_1.weight", "norm"),
    ("model.layers.0.mlp.gate.weight", "router"),
    ("model.layers.0.mlp.experts.3.gate_proj.weight", "gate"),
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", "down"),
    ("model.layers.0.mlp.experts.gate_up_proj", "gate_up"),
    ("model.embed_tokens.weight", "embed"),
    ("wte.weight", "embed"),
    ("lm_head.weight", "lm_head"),
])
def test_module_kind(name, kind):
    assert module_kind(name) == kind


def test_linear_scope_is_exactly_the_reference_set_for_llama():
    names = {f"model.layers.0.{m}.weight": (8, 8) for m in LLAMA_LINEAR}
    names |= {f"model.layers.0.self_attn.{m}.bias": (8,) for m in ("q_proj", "k_proj", "v_proj")}
    others = {"model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8), "model.norm.weight": (8,),
              "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
              "model.layers.0.self_attn.rotary_emb.inv_freq": (4,)}
    every = names | others

    def weight_shape(n):
        w = n[: -len(".bias")] + ".weight" if n.endswith(".bias") else None
        return every.get(w)

    picked = {n for n, s in every.items() if in_scope(n, s, "linear", weight_shape(n))}
    assert picked == set(names)
    attn = {n for n in picked if in_scope(n, every[n], "attn", weight_shape(n))}
    mlp = {n for n in picked if in_scope(n, every[n], "mlp", weight_shape(n))}
    assert attn | mlp == picked and not attn & mlp
    assert all("self_attn" in n for n in attn) and all(".mlp." in n for n in mlp)


def test_stacked_moe_experts_are_linear():
    assert in_scope("model.layers.1.mlp.experts.down_proj", (8, 16, 32), "linear")
    assert in_scope("model.layers.1.mlp.experts.down_proj", (8, 16, 32), "mlp")
    assert family("router") == "mlp"


def _scope(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    def wshape(n):
        return next((shapes[w] for w in weight_names(n) if w in shapes), None)

    return {n for n, s in shapes.items() if is_linear(n, s, wshape(n))}


def test_matrices_without_weight_suffix_and_fused_biases():
    shapes = {
        "model.layers.1.feed_forward.experts.gate_up_proj": (4, 32, 32),  # Llama 4: no .weight
        "model.layers.1.feed_forward.experts.down_proj": (4, 16, 32),
        "model.layers.1.feed_forward.router.weight": (4, 32),
        "model.layers.0.mlp.experts.gate_up_proj_bias": (4, 64),  # fused X_bias follows X
        "model.layers.0.mlp.experts.gate_up_proj": (4, 32, 64),
        "model.layers.0.mlp.gate.e_score_correction_bias": (4,),  # no matrix of that name: not a bias of one
        "model.layers.0.attn.in_proj_bias": (96,),
        "model.layers.0.attn.in_proj_weight": (96, 32),
        "model.layers.0.conv.weight": (32, 1, 4),  # >= 2 dims is a matrix
        "model.layers.0.mlp.down_proj.weight_scale_inv": (1, 1),  # FP8 scales are not matrices
        "model.layers.0.mlp.down_proj.scales": (2, 32),
        "model.layers.0.self_attn.q_norm.weight": (8,),
        "model.embed_tokens.weight": (96, 32),
    }
    assert _scope(shapes) == {
        "model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.1.feed_forward.experts.down_proj",
        "model.layers.1.feed_forward.router.weight", "model.layers.0.mlp.experts.gate_up_proj_bias",
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.attn.in_proj_bias", "model.layers.0.attn.in_proj_weight",
        "model.layers.0.conv.weight"}


def test_weight_names():
    assert weight_names("h.0.attn.c_attn.bias") == ("h.0.attn.c_attn.weight",)
    assert weight_names("layers.0.experts.down_proj_bias") == ("layers.0.experts.down_proj", "layers.0.experts.down_proj_weight")
    assert weight_names("layers.0.mlp.up_proj.weight") == ()


@pytest.mark.parametrize("name,want", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "language"),
    ("model.language_model.layers.0.mlp.up_proj.weight", "language"),
    ("model.layers.0.self_attn.q_proj.weight", "language"),
    ("lm_head.weight", "language"),
    ("vision_tower.encoder.layers.0.mlp.fc1.weight", "vision"),
    ("model.vision_tower.encoder.layers.1.self_attn.q_proj.weight", "vision"),
    ("visual.blocks.0.attn.qkv.weight", "vision"),
    ("visual.merger.mlp.0.weight", "vision"),
    ("vision_model.model.layers.0.mlp.fc1.weight", "vision"),
    ("multi_modal_projector.linear_1.weight", "projector"),
    ("model.mm_projector.0.weight", "projector"),
    ("audio_tower.layers.0.fc1.weight", "audio"),
    # A block whose own module happens to say "visual" is still the language model's.
    ("model.layers.0.visual.weight", "language"),
])
def test_tower(name, want):
    got = tower(name)
    assert got == want, f"{name}: {got}"
