"""PEFT LoRA on raw parameters (``target_parameters``), mapped onto the checkpoint's own tensors.

transformers 5 fuses MoE experts in memory: ``mlp.experts.gate_up_proj``
(E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I), while Qwen3-MoE,
DeepSeek-V3 and Mixtral files keep one 2-D tensor per expert. PEFT 0.21
adapts such a parameter with a ``ParamWrapper`` (``peft/tuners/lora/layer.py``)
and does so whenever a target names an expert projection (``"all-linear"``,
or DeepSeek-V3's dense ``mlp.gate_proj``). Its conventions, followed exactly:

- one pair per parameter: ``lora_A`` (r*E, d2) and ``lora_B`` (d1, r*E) for a
  parameter (E, d1, d2); expert e owns A's rows [e*r, (e+1)*r) and B's
  columns e, e+E, e+2E, ... (``weight_B.reshape(out, r, E)``), and its change
  is ``scale * B_e @ A_e``, or the transpose of that for experts a model marks
  ``is_transposed`` (stored (E, in, out), as gpt-oss and Aria do);
- a 2-D parameter (a router's ``gate.weight``) is a plain Linear change;
- r and lora_alpha come from ``rank_pattern`` / ``alpha_pattern`` matched
  against ``<module>.<parameter>`` (PEFT doubles both for ``gate_up_proj``);
- several parameters of one module nest one wrapper inside the other, so
  their keys are ``experts.base_layer.lora_A`` and ``experts.lora_A``, the
  parameter a key belongs to is not in its name. The shapes tell: gate_up
  (out 2I, in H) and down (out H, in I) never fit each other's tensors.

transformers' conversion (``conversion_mapping.py``) stacks expert e of the
fused ``gate_up_proj`` as ``cat([gate_e, up_e])`` (rows [0, I) gate, [I, 2I)
up) from ``experts.e.gate_proj`` / ``up_proj`` (Mixtral: ``w1`` / ``w3``, and
``block_sparse_moe.`` is loaded as ``mlp.``), and ``down_proj`` from
``experts.e.down_proj`` (``w2``). A file that stores the fused tensor itself
(Llama 4) takes the change as it is. Anything else is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from .header import TensorInfo
from .plan import LoraTerm

# Models whose experts transformers marks is_transposed: stored (E, in, out).
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text"})
# Fused parameter -> the per-expert tensors stacked into it, in row order, per file layout.
_SPLITS = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}
_BASE = ".base_layer"


class Wrapped(Protocol):
    """What is read here of an adapter module (adapter.LoraModule)."""

    module: str  # the module owning the parameters, base_layer stripped
    params: tuple[str, ...]  # the targeted parameters it may adapt
    key: str  # as the adapter's keys name it
    a: TensorInfo
    b: TensorInfo


@dataclass(frozen=True)
class Fit:
    """Where one parameter's change lands in instruct: ``(tensor name, term)`` pairs."""

    param: str
    terms: tuple[tuple[str, LoraTerm], ...]


def split_key(module: str) -> tuple[str, int]:
    """``(owner, depth)`` of a wrapper key's module: PEFT nests one wrapper per parameter under ``base_layer``.

    >>> split_key("model.layers.1.mlp.experts.base_layer")
    ('model.layers.1.mlp.experts', 1)
    """
    depth = 0
    while module.endswith(_BASE):
        module, depth = module[: -len(_BASE)], depth + 1
    return module, depth


def params_of(config: dict, module: str) -> list[str]:
    """Names of ``module``'s parameters that ``target_parameters`` selects, as PEFT matches them.

    >>> params_of({"target_parameters": ["gate_up_proj", "down_proj", "gate.weight"]}, "model.layers.1.mlp.gate")
    ['weight']
    """
    out = []
    for t in config.get("target_parameters") or []:
        p = str(t).rpartition(".")[2]
        key = f"{module}.{p}"
        if (key == t or key.endswith("." + str(t))) and p not in out:
            out.append(p)
    return out


def in_target_modules(config: dict, module: str) -> bool:
    """Whether ``target_modules`` (a list of suffixes or one regex) names ``module``, as PEFT checks it."""
    tm = config.get("target_modules")
    return tm != "all-linear" and names_module(tm, module)


def names_module(spec, module: str) -> bool:
    """Whether a PEFT module spec (``target_modules``, ``exclude_modules``: a list of name suffixes, or one regex
    matched whole) names ``module``."""
    if isinstance(spec, str):
        try:
            return re.fullmatch(spec, module) is not None
        except re.error:  # PEFT could not have used it either; the keys decide
            return False
    return any(module == t or module.endswith("." + t) for t in spec or [])


def probe(mod: Wrapped, names: Mapping[str, TensorInfo]) -> str | None:
    """One instruct name ``mod``'s change touches under the identity, for finding the adapter's prefix rule.

    None for a parameter LoRA whose tensors are not found as named: its file
    layout is not known before the rule is, so the other modules find it.
    """
    if not mod.params:
        return f"{mod.module}.weight"
    tries = []
    for p in mod.params:
        tries += [f"{m}.{p}" for m in _file_modules(mod.module)]
        tries += [f"{m}.0.{parts[0]}.weight" for m in _file_modules(mod.module) for parts in _SPLITS.get(p, ())]
    return next((t for t in tries if t in names), None)


def resolve(names: Mapping[str, TensorInfo], rule: Callable[[str], str], mod: Wrapped,
            scale_of: Callable[[str], tuple[int, float, float]], model_type: str | None,
            claimed: dict[tuple[str, str], str]) -> Fit | str:
    """The one targeted parameter of ``mod.module`` whose instruct tensors this wrapper's factors fit, or the problem.

    ``scale_of(key)`` is PEFT's ``(r, alpha, scale)`` for ``<module>.<parameter>``;
    ``claimed`` records which wrapper took each parameter, so two never take one.
    """
    fits, why = [], []
    for p in mod.params:
        r, _, scale = scale_of(f"{mod.module}.{p}")
        got = fit(names, rule, mod.module, p, mod.a, mod.b, r, scale, model_type)
        if isinstance(got, str):
            why.append(f"{p}: {got}")
        else:
            fits.append(got)
    what = f"adapter parameter LoRA '{mod.key}' (target_parameters {'/'.join(mod.params)})"
    if not fits:
        return f"{what} fits no instruct tensor ({'; '.join(why)})"
    if len(fits) > 1:
        return f"{what} fits {' and '.join(f.param for f in fits)} alike; which one it adapts is ambiguous"
    other = claimed.setdefault((mod.module, fits[0].param), mod.key)
    if other != mod.key:
        return f"{what} and '{other}' both fit {fits[0].param}; which one adapts it is ambiguous"
    return fits[0]


def fit(names: Mapping[str, TensorInfo], rule: Callable[[str], str], module: str, param: str, a: TensorInfo,
        b: TensorInfo, r: int, scale: float, model_type: str | None) -> Fit | str:
    """The terms that put ``scale * B @ A`` of ``module.param`` onto instruct's tensors, or why none fit."""
    if a.shape[0] % r or b.shape[1] != a.shape[0]:
        return f"factors {tuple(a.shape)}/{tuple(b.shape)} do not split into experts of rank r={r}"
    e_n, rows, cols = a.shape[0] // r, b.shape[0], a.shape[1]
    transposed = model_type in TRANSPOSED_EXPERTS
    for m in _file_modules(module):
        w = names.get(rule(f"{m}.{param}"))
        if w is None:
            continue
        name = rule(f"{m}.{param}")
        if len(w.shape) == 2 and e_n == 1 and tuple(w.shape) == (rows, cols):
            return Fit(param, ((name, LoraTerm(a, b, scale)),))
        if len(w.shape) == 3 and e_n > 1 and w.shape[0] == e_n:
            want = (e_n, cols, rows) if transposed else (e_n, rows, cols)
            if tuple(w.shape) == want:
                return Fit(param, ((name, LoraTerm(a, b, scale, transpose=transposed, experts=e_n)),))
        return f"instruct '{name}' {tuple(w.shape)} does not fit {e_n} expert(s) of ({rows}, {cols})"
    if transposed:
        return f"no instruct tensor '{module}.{param}' ({model_type} stores its experts fused)"
    for m in _file_modules(module):
        for parts in _SPLITS.get(param, ()):
            first = names.get(rule(f"{m}.0.{parts[0]}.weight"))
            if first is None:
                continue
            got = _per_expert(names, rule, m, parts, e_n, rows, cols, a, b, scale)
            return got if isinstance(got, str) else Fit(param, got)
    return f"no instruct tensor '{module}.{param}' nor per-expert '{module}.E.<proj>.weight'"


def _file_modules(module: str) -> list[str]:
    """The module's name in files: transformers loads Mixtral's ``block_sparse_moe.`` as ``mlp.``."""
    out = [module]
    if ".mlp." in f".{module}.":
        out.append(f".{module}.".replace(".mlp.", ".block_sparse_moe.", 1)[1:-1])
    return out


def _per_expert(names, rule, m, parts, e_n, rows, cols, a, b, scale) -> tuple[tuple[str, LoraTerm], ...] | str:
    """Expert e's part k takes rows [k*R, (k+1)*R) of the fused change, R being one part's rows."""
    if rows % len(parts):
        return f"{rows} rows do not split into {'/'.join(parts)}"
    height = rows // len(parts)
    if rule(f"{m}.{e_n}.{parts[0]}.weight") in names:
        return f"instruct has more than the adapter's {e_n} experts under '{rule(m)}'"
    out = []
    for e in range(e_n):
        for k, part in enumerate(parts):
            name = rule(f"{m}.{e}.{part}.weight")
            w = names.get(name)
            if w is None or len(w.shape) != 2 or tuple(w.shape) != (height, cols):
                have = "missing" if w is None else str(tuple(w.shape))
                return f"instruct '{name}' is {have}, not ({height}, {cols}) for expert {e} of {e_n}"
            span = (k * height, (k + 1) * height) if len(parts) > 1 else None
            out.append((name, LoraTerm(a, b, scale, experts=e_n, expert=e, rows=span)))
    return tuple(out)
