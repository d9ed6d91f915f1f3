"""Plan a PEFT LoRA adapter's merge into an instruct checkpoint: ``W_instruct + alpha * scale * B @ A``.

The adapter is read by ``adapter.py``. Each adapted module is matched to an
instruct tensor (through the one prefix rule when the adapter was trained on
another wrapper of the model, ``prefix.py``), and fused MoE expert
parameters go to the file tensors that hold them (``lora_params.py``).

A GPT-2 ``Conv1D`` weight is stored (in, out), so its change is
``(B @ A).T``. PEFT decides this per target module, whatever
``fan_in_fan_out`` says: it resets the flag to False (with a warning) for an
``nn.Linear`` and to True for a ``Conv1D`` (``dispatch_default`` in
``peft/tuners/lora/layer.py``). So do we, telling the two apart by the
instruct checkpoint's ``config.json`` model type (or, without one, GPT-2's
module names), and warning the same way.
"""

from __future__ import annotations

from typing import Sequence

from . import fp8
from .adapter import CONFIG_NAME, Adapter, LoraModule, module_scale
from .checkpoint import Checkpoint
from .files import read_config
from .errors import ShadowgraftError
from . import lora_params
from .plan import LoraTerm, Plan, items_with, select
from .prefix import find
from .shards import plan_shards


def plan_adapter(
    ins: Checkpoint,
    ad: Adapter,
    *,
    alpha: float = 1.0,
    alpha_for: Sequence[tuple[str, float]] = (),
    scope: str = "linear",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str | None = None,
    max_shard_size: int | None = None,
) -> Plan:
    """Plan ``W_instruct + alpha * scale * B @ A`` for every adapted module; every other tensor is copied.

    Terms outside ``scope`` / ``include`` / ``exclude`` are left out with a
    warning; a module with no matching instruct tensor, or a shape that does
    not fit, is an error naming it.

    >>> plan = plan_adapter(Checkpoint.open("./instruct"), open_adapter("./lora"))   # doctest: +SKIP
    >>> plan.grafted[:1]                                                             # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj.weight']
    """
    pick = select(ins, scope=scope, include=include, exclude=exclude)
    quant = fp8.scales(ins)  # FP8 weights are read dequantized, like floats
    terms: dict[str, LoraTerm] = {}
    problems, skipped = [], []
    renamed = []
    from .lowrank import is_conv1d  # lazy: lowrank loads torch

    model_type = _model_type(ins)
    flag_reset: list[str] = []  # modules whose kind overrides fan_in_fan_out, as PEFT resets it
    # PEFT names modules as the trained model held them: GPT2LMHeadModel's
    # transformer.h.0 for a checkpoint saying h.0, a text-only CausalLM's
    # model.layers.0 for a multimodal instruct's language_model.model.layers.0.
    # One prefix rule must pair them all (prefix.find), as transformers does.
    probes = [lora_params.probe(m, ins.tensors) for m in ad.modules]
    try:
        rule = find([p for p in probes if p], ins.tensors, what="the adapter", onto="instruct")
    except ShadowgraftError as e:
        raise ShadowgraftError(f"adapter {ad.source}: {e}") from None
    rename = rule or (lambda n: n)
    claimed: dict[tuple[str, str], str] = {}  # (module, parameter) -> the wrapper key that took it
    spread: list[str] = []  # instruct tensors that take part of a parameter LoRA
    for mod, probe in zip(ad.modules, probes):
        if mod.params:
            got = lora_params.resolve(ins.tensors, rename, mod, lambda key: module_scale(ad.config, key), model_type, claimed)
            if isinstance(got, str) and not mod.depth and rename(f"{mod.module}.weight") in ins:
                # target_modules did not say (an unresolved "all-linear"): a module weight that fits is a module.
                r, alpha_m, scale = module_scale(ad.config, mod.module)
                if mod.a.shape[0] != r or mod.b.shape[1] != r:
                    problems.append(f"'{mod.module}' factors have rank {mod.a.shape[0]}/{mod.b.shape[1]} but {CONFIG_NAME} gives r={r}")
                    continue
                mod = LoraModule(mod.module, mod.a, mod.b, r, alpha_m, scale, False)
            elif isinstance(got, str):
                problems.append(got)
                continue
            else:
                if rename(probe or mod.module) != (probe or mod.module):
                    renamed.append(f"{mod.key} -> {rename(mod.module)}")
                for target, term in got.terms:
                    if target in terms or not (ins[target].is_float or target in quant):
                        problems.append(f"'{target}' takes two adapter terms" if target in terms else
                                        f"'{target}' is {ins[target].dtype} in instruct, which cannot be grafted")
                    elif pick(target):
                        terms[target] = term
                        spread.append(target)
                    else:
                        skipped.append(target)
                continue
        target = rename(f"{mod.module}.weight")
        if target not in ins:
            problems.append(_no_target(ins, mod))
            continue
        if target != f"{mod.module}.weight":
            renamed.append(f"{mod.module} -> {target}")
        if not pick(target):
            skipped.append(target)
            continue
        w = ins[target]
        # Embeddings and GPT-2 Conv1D weights hold (B @ A).T. For other
        # modules PEFT merges as nn.Linear whatever fan_in_fan_out says.
        conv = not mod.embedding and is_conv1d(mod.module, model_type)
        if not mod.embedding and conv != ad.fan_in_fan_out:
            flag_reset.append(mod.module)
        transpose = mod.embedding or conv
        rows, cols = mod.b.shape[0], mod.a.shape[1]
        want = (cols, rows) if transpose else (rows, cols)
        if not (w.is_float or target in quant):
            problems.append(f"'{target}' is {w.dtype} in instruct, which cannot be grafted")
        elif tuple(w.shape) != want:
            hint = ""
            if not mod.embedding and tuple(w.shape) == want[::-1]:
                how = "a GPT-2 Conv1D, stored (in, out)" if conv else "an nn.Linear, stored (out, in)"
                why = f"config.json model_type '{model_type}'" if model_type else "its name (instruct has no config.json model_type)"
                hint = (f" (it fits transposed: '{mod.module}' is {how}, going by {why}; "
                        "was the adapter trained on another architecture?)")
            problems.append(f"'{target}': instruct {tuple(w.shape)} does not fit the adapter's change {want}{hint}")
        else:
            terms[target] = LoraTerm(mod.a, mod.b, mod.scale, transpose)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShadowgraftError(f"adapter {ad.source}: " + "; ".join(problems[:3]) + more)
    warnings = []
    if flag_reset:
        kind = "torch.nn.Linear" if ad.fan_in_fan_out else "GPT-2 Conv1D"
        warnings.append(f"fan_in_fan_out is {ad.fan_in_fan_out} in {CONFIG_NAME} but {len(flag_reset)} target module(s) are "
                        f"{kind} ({_names(flag_reset)}); merged with fan_in_fan_out={not ad.fan_in_fan_out} there, as PEFT does")
    if renamed:
        warnings.append(f"{len(renamed)} adapter module(s) matched instruct through its model prefix, as transformers loads them "
                        f"(prefix change {rule}): {_names(renamed)}")
    if skipped:
        warnings.append(f"{len(skipped)} adapter term(s) not selected by --scope {scope}/--include/--exclude are left out: "
                        f"{_names(skipped)}; pass --scope all to graft them")
    if ad.frozen_copies:
        warnings.append(f"the adapter also stores full copies of {_names(list(ad.frozen_copies))} (PEFT save_embedding_layers); "
                        "they are base's frozen weights and are not grafted")
    notes = []
    if claimed:
        kinds = sorted({f"{m.rpartition('.')[2]}.{p}" for m, p in claimed})
        notes.append(f"LoRA on {len(claimed)} parameter(s) ({', '.join(kinds)}; target_parameters) is grafted onto {len(spread)} "
                     f"instruct tensor(s), a fused expert parameter onto each expert's own: {_names(sorted(spread))}")
    items = items_with(ins, dtype, terms, alpha=alpha, alpha_for=alpha_for)
    return Plan(tuple(plan_shards(ins, items, max_shard_size)), alpha, scope, tuple(warnings), tuple(notes),
                alpha_for=tuple(alpha_for),
                renames=(("adapter", rule),) if rule else ())


def _model_type(ins: Checkpoint) -> str | None:
    """``model_type`` from the instruct checkpoint's config.json, when it has a readable one."""
    mt = read_config(ins.root).get("model_type")
    return mt if isinstance(mt, str) else None


def _no_target(ins: Checkpoint, mod: LoraModule) -> str:
    want = f"{mod.module}.weight"
    tail = want.partition(".")[2] or want
    close = [n for n in ins.tensors if n.endswith("." + tail) or n == tail]
    hint = f" (instruct has '{close[0]}': the adapter was trained on a model with other module names)" if close else ""
    return f"adapter module '{mod.module}' matches no instruct tensor '{want}'{hint}"


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")
