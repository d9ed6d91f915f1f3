"""LoRA on fused MoE expert parameters (PEFT ``target_parameters``) onto the files' tensors, against float64 einsums.

The references are written from PEFT's ParamWrapper as documented in
lora_params.py (``einsum("o r e, e r i -> e o i")``, transposed for
``is_transposed`` experts) and transformers' stacking of gate and up rows,
not from shadowgraft's code.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import shadowgraft
from shadowgraft import Checkpoint, ShadowgraftError
from shadowgraft.engine import Engine
from shadowgraft.adapter import open_adapter
from shadowgraft.lora import plan_adapter
from shadowgraft.lora_params import params_of, split_key

from .conftest import assert_exact, load, run_cli

E, H, I = 3, 8, 6  # experts, hidden, one expert's intermediate size
R, R_GU = 2, 4  # PEFT doubles r (and lora_alpha) for the fused gate_up_proj
ROUTER_RANK = 2


def _factors(e_n, r, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r * e_n, cols, generator=g), 0.05 * torch.randn(rows, r * e_n, generator=g)


def _delta(a, b, e_n, scale, transposed=False):
    """PEFT's fused delta in float64: (E, out, in), or (E, in, out) for is_transposed experts."""
    a64, b64 = a.double().reshape(e_n, -1, a.shape[1]), b.double().reshape(b.shape[0], -1, e_n)
    return torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", b64, a64) * scale


def _write(folder, tensors, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _adapter(folder, keys, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in keys.items()}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 4, "target_modules": ["q_proj"],
              "target_parameters": ["gate_up_proj", "down_proj"], "rank_pattern": {r".*\.gate_up_proj": R_GU},
              "alpha_pattern": {r".*\.gate_up_proj": 8}, "bias": "none", "init_lora_weights": False}
    config.update(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _per_expert_case(tmp_path, *, style="qwen", dtype=torch.bfloat16, gate_up_deeper=True, experts_in_file=E):
    """instruct with one 2-D tensor per expert; an adapter on the fused gate_up_proj / down_proj and the router."""
    g = torch.Generator().manual_seed(1)
    moe, (gate, up, down) = ("block_sparse_moe", ("w1", "w3", "w2")) if style == "mixtral" else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    ins = {"model.layers.0.self_attn.q_proj.weight": torch.randn(H, H, generator=g),
           f"model.layers.0.{moe}.gate.weight": torch.randn(E, H, generator=g)}
    for e in range(experts_in_file):
        ins[f"model.layers.0.{moe}.experts.{e}.{gate}.weight"] = torch.randn(I, H, generator=g)
        ins[f"model.layers.0.{moe}.experts.{e}.{up}.weight"] = torch.randn(I, H, generator=g)
        ins[f"model.layers.0.{moe}.experts.{e}.{down}.weight"] = torch.randn(H, I, generator=g)
    ins = {k: v.to(dtype) for k, v in ins.items()}
    gu, dn, rt = _factors(E, R_GU, 2 * I, H, 2), _factors(E, R, H, I, 3), _factors(1, ROUTER_RANK, E, H, 4)
    # PEFT nests the wrapper made first (gate_up_proj, defined first) under base_layer; the keys don't say which is which.
    inner, outer = (gu, dn) if gate_up_deeper else (dn, gu)
    keys = {"model.layers.0.mlp.experts.base_layer.lora_A.weight": inner[0], "model.layers.0.mlp.experts.base_layer.lora_B.weight": inner[1],
            "model.layers.0.mlp.experts.lora_A.weight": outer[0], "model.layers.0.mlp.experts.lora_B.weight": outer[1],
            "model.layers.0.mlp.gate.lora_A.weight": rt[0], "model.layers.0.mlp.gate.lora_B.weight": rt[1]}
    ad = _adapter(tmp_path / "lora", keys, target_parameters=["gate_up_proj", "down_proj", "gate.weight"])
    ref = {k: v.double() for k, v in ins.items()}
    d_gu, d_dn = _delta(*gu, E, 8 / R_GU), _delta(*dn, E, 4 / R)
    for e in range(E):
        # transformers stacks expert e as cat([gate_e, up_e]): rows [0, I) gate, [I, 2I) up.
        ref[f"model.layers.0.{moe}.experts.{e}.{gate}.weight"] += d_gu[e, :I]
        ref[f"model.layers.0.{moe}.experts.{e}.{up}.weight"] += d_gu[e, I:]
        ref[f"model.layers.0.{moe}.experts.{e}.{down}.weight"] += d_dn[e]
    ref[f"model.layers.0.{moe}.gate.weight"] += (4 / R) * rt[1].double() @ rt[0].double()
    return _write(tmp_path / "instruct", ins), ad, ins, ref


def _check(out, ins, ref):
    got = load(out)
    assert set(got) == set(ins)
    for n, r in ref.items():
        if torch.equal(r, ins[n].double()):
            assert torch.equal(got[n], ins[n]), n
        else:
            assert got[n].dtype == ins[n].dtype
            assert_exact(got[n], r)
            assert not torch.equal(got[n], ins[n]), n


def test_names_of_nested_wrappers():
    assert split_key("model.layers.3.mlp.experts.base_layer.base_layer") == ("model.layers.3.mlp.experts", 2)
    assert split_key("model.layers.3.mlp.experts") == ("model.layers.3.mlp.experts", 0)
    cfg = {"target_parameters": ["gate_up_proj", "model.layers.3.mlp.experts.down_proj", "gate.weight"]}
    assert params_of(cfg, "model.layers.3.mlp.experts") == ["gate_up_proj", "down_proj"]
    assert params_of(cfg, "model.layers.4.mlp.experts") == ["gate_up_proj"]
    assert params_of(cfg, "model.layers.3.mlp.gate") == ["gate_up_proj", "weight"]


@pytest.mark.parametrize("style", ["qwen", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate_up_deeper", [True, False])
def test_fused_expert_lora_onto_per_expert_tensors(tmp_path, style, dtype, gate_up_deeper):
    ins_dir, ad, ins, ref = _per_expert_case(tmp_path, style=style, dtype=dtype, gate_up_deeper=gate_up_deeper)
    res = shadowgraft.apply(instruct=ins_dir, adapter=ad, output=tmp_path / "out", scope="all")
    assert len(res.plan.grafted) == 3 * E + 1
    assert res.plan.notes == (f"LoRA on 3 parameter(s) (experts.down_proj, experts.gate_up_proj, gate.weight; target_parameters) "
                              f"is grafted onto {3 * E + 1} instruct tensor(s), a fused expert parameter onto each expert's own: "
                              f"{', '.join(sorted(ref)[:3])}, ...",)
    _check(tmp_path / "out", ins, ref)


def test_row_blocks_across_experts_do_not_change_a_byte(tmp_path):
    # A fused (E, d1, d2) tensor streamed in row blocks that start and end inside an expert.
    e_n, d1, d2 = 5, 7, 6
    g = torch.Generator().manual_seed(0)
    ins = {"model.layers.0.feed_forward.experts.gate_up_proj": torch.randn(e_n, d1, d2, generator=g).to(torch.bfloat16)}
    a, b = _factors(e_n, R, d1, d2, 5)
    ad = _adapter(tmp_path / "lora", {"model.layers.0.feed_forward.experts.lora_A.weight": a,
                                      "model.layers.0.feed_forward.experts.lora_B.weight": b},
                  target_parameters=["feed_forward.experts.gate_up_proj"], rank_pattern={}, alpha_pattern={})
    ck = Checkpoint.open(_write(tmp_path / "instruct", ins))
    with open_adapter(ad) as adapter:
        plan = plan_adapter(ck, adapter)
        outs = []
        for chunk in (1, 2 * d2, 3 * d2, 1 << 20):
            Engine([ck, adapter.checkpoint], chunk=chunk).write_shard(plan.shards[0], tmp_path / f"{chunk}.safetensors")
            outs.append((tmp_path / f"{chunk}.safetensors").read_bytes())
    assert len(set(outs)) == 1
    got = load(tmp_path / "1.safetensors")["model.layers.0.feed_forward.experts.gate_up_proj"]
    assert_exact(got, ins["model.layers.0.feed_forward.experts.gate_up_proj"].double() + _delta(a, b, e_n, 4 / R))


@pytest.mark.parametrize("model_type,transposed", [("llama4_text", False), ("gpt_oss", True)])
def test_fused_expert_lora_onto_fused_tensors(tmp_path, model_type, transposed):
    # Files that keep the fused tensor: the change goes on as PEFT adds it; is_transposed experts (gpt-oss) are
    # stored (E, in, out), so there A's columns run along d1 and B's rows along d2.
    e_n, d1, d2 = 4, 10, 6
    g = torch.Generator().manual_seed(0)
    w = torch.randn(e_n, d1, d2, generator=g).to(torch.bfloat16)
    rows, cols = (d2, d1) if transposed else (d1, d2)
    a, b = _factors(e_n, R, rows, cols, 6)
    ad = _adapter(tmp_path / "lora", {"model.layers.0.mlp.experts.lora_A.weight": a, "model.layers.0.mlp.experts.lora_B.weight": b},
                  rank_pattern={}, alpha_pattern={})
    ins_dir = _write(tmp_path / "instruct", {"model.layers.0.mlp.experts.down_proj": w}, {"model_type": model_type})
    shadowgraft.apply(instruct=ins_dir, adapter=ad, output=tmp_path / "out")
    got = load(tmp_path / "out")["model.layers.0.mlp.experts.down_proj"]
    assert_exact(got, w.double() + _delta(a, b, e_n, 4 / R, transposed=transposed))


@pytest.mark.parametrize("case,pattern", [
    ("more_experts", r"adapter parameter LoRA 'model\.layers\.0\.mlp\.experts(\.base_layer)?' \(target_parameters "
                     r"gate_up_proj/down_proj\) fits no instruct tensor \(gate_up_proj: instruct has more than the adapter's 3 experts"),
    ("no_target_parameters", r"'model\.layers\.0\.mlp\.experts\.base_layer' is a nested LoRA layer but adapter_config\.json "
                             r"targets no parameter of 'model\.layers\.0\.mlp\.experts' \(target_parameters\)"),
    ("wrong_rank", r"fits no instruct tensor \(gate_up_proj: .*; down_proj: factors \(6, 6\)/\(8, 6\) do not split into experts of rank r=5\)"),
])
def test_refusals_name_the_wrapper(tmp_path, capsys, case, pattern):
    ins_dir, ad, _, _ = _per_expert_case(tmp_path, experts_in_file=E + 1 if case == "more_experts" else E)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    if case == "no_target_parameters":
        del cfg["target_parameters"]
    elif case == "wrong_rank":
        cfg["r"] = 5
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "apply", "--instruct", ins_dir, "--adapter", ad, "--output", tmp_path / "out")
    assert code == 1 and err.strip().count("\n") == 0 and "Traceback" not in err
    import re

    assert re.search(pattern, " ".join(err.split())), err
    assert not (tmp_path / "out").exists()


def test_adapter_and_parameter_lora_on_one_module_is_refused(tmp_path):
    ins_dir, ad, _, _ = _per_expert_case(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["experts"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShadowgraftError, match=r"'model\.layers\.0\.mlp\.experts' is adapted both as a module \(target_modules\) "
                                               r"and through its parameters \(target_parameters\)"):
        open_adapter(ad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("style", ["qwen", "mixtral"])
def test_cuda_expert_lora_matches_cpu_byte_for_byte(tmp_path, style):
    ins_dir, ad, ins, ref = _per_expert_case(tmp_path, style=style)
    for device in ("cpu", "cuda"):
        shadowgraft.apply(instruct=ins_dir, adapter=ad, output=tmp_path / device, scope="all", device=device)
    _check(tmp_path / "cuda", ins, ref)
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (tmp_path / "cuda" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_expert_lora_onto_fp8_block_quantized_experts(tmp_path, dtype):
    # DeepSeek-V3 as published: every expert an F8_E4M3 weight with 128x128 block scales. An expert tensor of
    # 130 rows spans two row blocks; each expert's change is added to its dequantized values.
    import numpy as np

    from .test_fp8 import codes_of, deq, fp8_tensors, ref_quantize, write

    e_n, inter, hidden = 3, 130, 96
    rng = np.random.default_rng(0)
    ins = {}
    for e in range(e_n):
        for part, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            ins.update(fp8_tensors(rng.normal(0, 0.02, shape), f"model.layers.0.mlp.experts.{e}.{part}.weight"))
    ins_dir = write(tmp_path / "instruct", ins, quantized=True)
    gu, dn = _factors(e_n, R_GU, 2 * inter, hidden, 7), _factors(e_n, R, hidden, inter, 8)
    ad = _adapter(tmp_path / "lora", {"model.layers.0.mlp.experts.base_layer.lora_A.weight": gu[0],
                                      "model.layers.0.mlp.experts.base_layer.lora_B.weight": gu[1],
                                      "model.layers.0.mlp.experts.lora_A.weight": dn[0],
                                      "model.layers.0.mlp.experts.lora_B.weight": dn[1]})
    shadowgraft.apply(instruct=ins_dir, adapter=ad, output=tmp_path / "out", dtype=dtype)
    got = load(tmp_path / "out")
    d_gu, d_dn = _delta(*gu, e_n, 8 / R_GU).numpy(), _delta(*dn, e_n, 4 / R).numpy()
    for e in range(e_n):
        for part, d in (("gate_proj", d_gu[e, :inter]), ("up_proj", d_gu[e, inter:]), ("down_proj", d_dn[e])):
            name = f"model.layers.0.mlp.experts.{e}.{part}.weight"
            ref = deq(ins, name) + d
            if dtype == "auto":
                codes, scales = ref_quantize(ref)
                assert np.array_equal(codes_of(got[name]), codes) and np.array_equal(got[name + "_scale_inv"].numpy(), scales)
            else:
                assert_exact(got[name], torch.from_numpy(ref))
