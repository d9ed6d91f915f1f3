"""What a tensor is, read from its name and shape alone.

Scope is structural so that Llama, Qwen, Mistral, Gemma, MoE, BERT and GPT-2
names all work without a per-architecture table: a *linear* tensor is a 2-D
(or stacked 3-D expert) weight inside a transformer block, or the bias of
such a module. For Llama names this selects exactly q/k/v/o/gate/up/down
weights and biases, the set the Shadow-FT reference script grafts.
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
    """True for block matrices and their biases; ``weight_shape`` is the sibling ``.weight``'s shape for a bias."""
    if block_index(name) is None:
        return False
    if module_kind(name) in ("norm", "embed", "lm_head"):
        return False
    if name.endswith(".bias"):
        return weight_shape is not None and len(weight_shape) in (2, 3)
    return len(shape) in (2, 3)


def in_scope(name: str, shape: tuple[int, ...], scope: str, weight_shape: tuple[int, ...] | None = None) -> bool:
    """Whether ``scope`` (linear, attn, mlp, all) covers this tensor; ``all`` means every tensor."""
    if scope == "all":
        return True
    if not is_linear(name, shape, weight_shape):
        return False
    if scope == "linear":
        return True
    return family(module_kind(name)) == scope


def sibling_weight(name: str) -> str | None:
    return name[: -len(".bias")] + ".weight" if name.endswith(".bias") else None
