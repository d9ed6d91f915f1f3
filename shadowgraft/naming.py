"""What a tensor is, read from its name and shape alone.

Scope is structural so that every family works without a per-architecture
table. The rule, stated once (``is_linear``): a tensor with two or more
dimensions inside a numbered block (``layers.N``, ``layer.N``, ``h.N``,
``blocks.N``, ``block.N``) that is not a norm, an embedding or a
quantization scale is a weight matrix, whether or not its name ends in
``.weight`` (Llama 4's fused ``experts.gate_up_proj``); MoE routers are
matrices too. A bias follows its matrix: ``X.bias`` for ``X.weight``,
``X_bias`` for a fused ``X`` (or ``X_weight``). Every tower's blocks count.
Whether a tensor is floating is the caller's test (``plan.select``), since
dtypes live in headers, not names. For Llama names this selects exactly
q/k/v/o/gate/up/down weights and biases, the set the Shadow-FT reference
script grafts.

A multimodal checkpoint holds several towers, told apart by name prefix
(``tower``): the language model, a vision tower, a projector between them,
an audio tower.
"""

from __future__ import annotations

import re

SCOPES = ("linear", "attn", "mlp", "all")

# Block containers across families: model.layers.N (Llama), encoder.layer.N
# (BERT), transformer.h.N (GPT-2), block.N / blocks.N (T5, ViT-style).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# Last module component -> kind. Order matters only where noted.
_KINDS = [
    ("qkv", r"qkv_proj|c_attn|query_key_value|wqkv|qkv|in_proj"),
    ("q", r"q_proj|query|q|wq|q_lin|q_a_proj|q_b_proj"),
    ("k", r"k_proj|key|k|wk|k_lin"),
    ("v", r"v_proj|value|v|wv|v_lin"),
    ("kv", r"kv_a_proj_with_mqa|kv_b_proj"),
    ("o", r"o_proj|out_proj|wo|out_lin|dense_out"),
    ("gate_up", r"gate_up_proj|w13"),
    ("gate", r"gate_proj|w1"),
    ("up", r"up_proj|w3|c_fc|fc1|fc_in|dense_h_to_4h|lin1|wi|wi_0|wi_1"),
    ("down", r"down_proj|w2|fc2|fc_out|dense_4h_to_h|lin2"),
    ("router", r"router|gate|switch"),
]
_KIND_RE = [(k, re.compile(rf"^(?:{p})$")) for k, p in _KINDS]
_ATTN_PATH = re.compile(r"(?:^|\.)(?:self_attn|attn|attention|self_attention|cross_attn|mixer|SelfAttention|EncDecAttention)\.")
_MLP_PATH = re.compile(r"(?:^|\.)(?:mlp|ffn|feed_forward|block_sparse_moe|moe|experts|intermediate|DenseReluDense|shared_expert)\.")
_NORM = re.compile(r"norm|(?:^|\.)ln_?\w*\.", re.IGNORECASE)
_EMBED = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|relative_attention_bias|position_bias")
# Scales and zero points of quantized weights (FP8 weight_scale_inv, GPTQ
# scales) sit beside their matrix with matrix-like shapes but are not one.
_QUANT_AUX = re.compile(r"(?:^|\.|_)(?:weight_scale_inv|weight_scale|input_scale|scales|qzeros|g_idx|absmax|SCB)$")
ATTN_KINDS = frozenset({"q", "k", "v", "kv", "qkv", "o", "attn"})
MLP_KINDS = frozenset({"gate", "up", "down", "gate_up", "router", "experts", "mlp"})


def block_index(name: str) -> int | None:
    """``'model.layers.12.mlp.up_proj.weight'`` -> 12; None outside transformer blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def _module(name: str) -> str:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def module_kind(name: str) -> str:
    """Coarse role of a tensor: q/k/v/o/qkv, gate/up/down, router, experts, norm, embed, lm_head, ...

    >>> module_kind("encoder.layer.0.attention.self.query.weight")
    'q'
    """
    if "lm_head" in name or name.endswith("output.weight") and block_index(name) is None:
        return "lm_head"
    if _EMBED.search(name):
        return "embed"
    mod = _module(name)
    last = mod.rsplit(".", 1)[-1]
    if _NORM.search(mod + ".") or last.startswith(("ln", "norm")):
        return "norm"
    in_attn, in_mlp = bool(_ATTN_PATH.search(mod + ".")), bool(_MLP_PATH.search(mod + "."))
    # BERT: attention.output.dense is the attention out-projection; output.dense
    # outside attention is the MLP down-projection.
    if last == "dense":
        if ".attention.output." in mod + ".":
            return "o"
        if mod.endswith(".output.dense") or mod.endswith("intermediate.dense"):
            return "down" if mod.endswith(".output.dense") else "up"
    # GPT-2 Conv1D: c_proj is attention out or MLP down depending on the parent.
    if last == "c_proj":
        return "o" if in_attn else "down"
    if re.search(r"(?:^|\.)experts(?:\.|$)", mod):
        # Stacked experts (experts.gate_up_proj) or per-expert modules (experts.3.w1).
        for kind, rx in _KIND_RE:
            if rx.match(last) and kind != "router":
                return kind
        return "experts"
    for kind, rx in _KIND_RE:
        if rx.match(last):
            if kind == "router" and not in_mlp:
                break
            return kind
    if in_attn:
        return "attn"
    if in_mlp:
        return "mlp"
    return "other"


def family(kind: str) -> str:
    """'attn', 'mlp' or the kind itself."""
    if kind in ATTN_KINDS:
        return "attn"
    if kind in MLP_KINDS:
        return "mlp"
    return kind


def is_linear(name: str, shape: tuple[int, ...], weight_shape: tuple[int, ...] | None = None) -> bool:
    """True for block matrices and their biases; ``weight_shape`` is the shape of the bias's matrix (``weight_names``).

    >>> is_linear("model.layers.1.feed_forward.experts.gate_up_proj", (16, 5120, 16384))
    True
    """
    if block_index(name) is None:
        return False
    if module_kind(name) in ("norm", "embed", "lm_head") or _QUANT_AUX.search(name):
        return False
    if weight_names(name):
        return weight_shape is not None and len(weight_shape) >= 2
    return len(shape) >= 2


def in_scope(name: str, shape: tuple[int, ...], scope: str, weight_shape: tuple[int, ...] | None = None) -> bool:
    """Whether ``scope`` (linear, attn, mlp, all) covers this tensor; ``all`` means every tensor."""
    if scope == "all":
        return True
    if not is_linear(name, shape, weight_shape):
        return False
    if scope == "linear":
        return True
    return family(module_kind(name)) == scope


def weight_names(name: str) -> tuple[str, ...]:
    """The names a bias's matrix may have: ``X.weight`` for ``X.bias``; ``X`` or ``X_weight`` for a fused ``X_bias``.

    Empty for a tensor that is not a bias.
    """
    if name.endswith(".bias"):
        return (name[: -len(".bias")] + ".weight",)
    if name.endswith("_bias"):
        stem = name[: -len("_bias")]
        return (stem, stem + "_weight")
    return ()


TOWERS = ("language", "vision", "projector", "audio")
# A tower is named by one component of the path before its blocks:
# vision_tower.encoder.layers.0 (LLaVA, Gemma 3), visual.blocks.0 (Qwen-VL),
# vision_model.model.layers.0 (Llama 4, Idefics), model.vision_tower.* (the
# layout transformers 5 loads into). Everything else is the language model.
_TOWER_RE = [(t, re.compile(rf"(?:^|\.)(?:{p})\.")) for t, p in [
    ("vision", r"vision_tower|visual|vision_model|vision_encoder"),
    ("projector", r"multi_modal_projector|mm_projector|multimodal_projector"),
    ("audio", r"audio_tower|audio_model|audio_encoder"),
]]


def tower(name: str) -> str:
    """Which part of a (multimodal) model a tensor belongs to: language, vision, projector or audio.

    >>> tower("vision_tower.encoder.layers.0.mlp.fc1.weight"), tower("language_model.model.layers.0.mlp.up_proj.weight")
    ('vision', 'language')
    """
    m = _BLOCK.search(name)
    head = name[: m.start() + 1] if m else name
    for t, rx in _TOWER_RE:
        if rx.search(head):
            return t
    return "language"
