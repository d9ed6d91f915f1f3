"""``apply --adapter``: PEFT LoRA adapters merged onto instruct, against a float64 reference."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shadowgraft
from shadowgraft import ShadowgraftError
from shadowgraft.adapter import module_scale, open_adapter, pattern_key
from shadowgraft.synthetic import Shape, gpt2_tensors, make_trio

from .conftest import assert_exact, load, run_cli

LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHAPE = Shape(layers=2, hidden=64, intermediate=96, vocab=128)


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, embedding=(), extra_tensors=None,
                  **config) -> Path:
    """A PEFT-format adapter folder: ``factors`` maps module -> (A, B) as PEFT stores them."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        if module in embedding:
            tensors[f"base_model.model.{module}.lora_embedding_A"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_embedding_B"] = b.contiguous()
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.clone()
    tensors.update(extra_tensors or {})
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
           "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
           "task_type": "CAUSAL_LM", "base_model_name_or_path": "base", "init_lora_weights": True}
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def random_factors(shapes: dict[str, tuple[int, int]], ranks: dict[str, int] | int, *, seed=0, dtype=torch.float32):
    """module -> (A: r x in, B: out x r) for weights of shape (out, in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (rows, cols) in shapes.items():
        r = ranks if isinstance(ranks, int) else ranks[module]
        a = (torch.randn(r, cols, generator=g) / math.sqrt(cols)).to(dtype)
        b = (0.01 * torch.randn(rows, r, generator=g) / math.sqrt(r)).to(dtype)
        out[module] = (a, b)
    return out


def llama_shapes(inst: dict[str, torch.Tensor], layers=range(2), kinds=LLAMA) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{k}": tuple(inst[f"model.layers.{i}.{k}.weight"].shape) for i in layers for k in kinds}


def check(out: Path, inst: dict, factors: dict, scales: dict, alpha: float, transpose=()) -> None:
    """Every adapted weight equals W + alpha * scale * B @ A (float64, rounded once); the rest are untouched."""
    got = load(out)
    assert set(got) == set(inst)
    ys, refs = [], []
    for name, w in inst.items():
        module = name[: -len(".weight")]
        if module in factors:
            a, b = factors[module]
            d = b.double() @ a.double()
            d = d.T if module in transpose else d
            ref = w.double() + alpha * scales[module] * d
            assert got[name].dtype == w.dtype
            assert_exact(got[name], ref, min_exact=0.99)  # every element within 1 ulp
            assert not torch.equal(got[name], w), name
            ys.append(got[name].reshape(-1))
            refs.append(ref.reshape(-1))
        else:
            assert torch.equal(got[name].view(torch.uint8), w.view(torch.uint8)), name
    # fp32 arithmetic rounded once: over the whole model >= 99.99% bit-exact.
    # (A single 4096-element tensor can hold one double-rounding miss.)
    assert_exact(torch.cat(ys), torch.cat(refs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_adapter_matches_float64_reference(tmp_path, dtype, alpha):
    trio = make_trio(tmp_path / "in", shape=SHAPE, dtype=dtype, shard_bytes=60_000)
    inst = load(trio["instruct"])
    factors = random_factors(llama_shapes(inst), 8)
    ad = write_adapter(tmp_path / "lora", factors, r=8, lora_alpha=16)
    res = shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "out", alpha=alpha)
    assert sorted(res.plan.grafted) == sorted(f"{m}.weight" for m in factors)
    check(tmp_path / "out", inst, factors, {m: 2.0 for m in factors}, alpha)
    meta = json.loads((tmp_path / "out" / "shadowgraft.json").read_text())
    assert meta["mode"] == "adapter" and meta["inputs"]["adapter"]["r"] == 8 and meta["inputs"]["adapter"]["lora_alpha"] == 16
    assert "B @ A" in meta["formula"]


def test_bf16_adapter_factors(tmp_path):
    trio = make_trio(tmp_path / "in", shape=SHAPE)
    inst = load(trio["instruct"])
    factors = random_factors(llama_shapes(inst, kinds=LLAMA[:4]), 4, dtype=torch.bfloat16)
    ad = write_adapter(tmp_path / "lora", factors, r=4, lora_alpha=8)
    shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "out")
    check(tmp_path / "out", inst, factors, {m: 2.0 for m in factors}, 1.0)


def test_rslora_rank_and_alpha_patterns(tmp_path):
    trio = make_trio(tmp_path / "in", shape=SHAPE, dtype=torch.float32)
    inst = load(trio["instruct"])
    shapes = llama_shapes(inst)
    # Per-module (r, alpha) written out by hand, as PEFT resolves them:
    # a bare name matches that module anywhere, a dotted path matches only there.
    rank_pattern = {"q_proj": 4, "layers.1.mlp.down_proj": 12}
    alpha_pattern = {"v_proj": 3, "model.layers.0.mlp.up_proj": 40}
    want = {}
    for m in shapes:
        r = 4 if m.endswith("q_proj") else 12 if m == "model.layers.1.mlp.down_proj" else 8
        a = 3 if m.endswith("v_proj") else 40 if m == "model.layers.0.mlp.up_proj" else 16
        want[m] = (r, a)
    factors = random_factors(shapes, {m: r for m, (r, _) in want.items()})
    for rslora in (False, True):
        ad = write_adapter(tmp_path / f"lora{rslora}", factors, r=8, lora_alpha=16, use_rslora=rslora,
                           rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
        scales = {m: a / (math.sqrt(r) if rslora else r) for m, (r, a) in want.items()}
        shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / f"out{rslora}")
        check(tmp_path / f"out{rslora}", inst, factors, scales, 1.0)


def test_pattern_matching_follows_peft():
    assert pattern_key(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(["layers.1.mlp.up_proj"], "model.layers.11.mlp.up_proj") is None
    assert pattern_key(["proj"], "model.layers.0.self_attn.q_proj") is None  # whole components only
    assert pattern_key(["k_proj", "self_attn.k_proj"], "model.layers.0.self_attn.k_proj") == "k_proj"  # first match wins
    cfg = {"r": 16, "lora_alpha": 32, "rank_pattern": {"o_proj": 4}}
    assert module_scale(cfg, "model.layers.3.self_attn.o_proj") == (4, 32, 8.0)
    assert module_scale({**cfg, "use_rslora": True}, "model.layers.3.mlp.up_proj") == (16, 32, 8.0)


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    trio = make_trio(tmp_path / "in", names=list(gpt2_tensors()), dtype=torch.float32)
    inst = load(trio["instruct"])
    # Conv1D stores (in, out); PEFT's lora_A is still (r, in) and lora_B (out, r).
    mods = [f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    shapes = {m: tuple(reversed(inst[f"{m}.weight"].shape)) for m in mods}
    factors = random_factors(shapes, 4)
    # PEFT on GPT2LMHeadModel names modules transformer.h.N...; GPT-2 checkpoints store h.N... (the
    # base model's names), which transformers maps by dropping the prefix. So do we.
    ad = write_adapter(tmp_path / "lora", {f"transformer.{m}": f for m, f in factors.items()}, r=4, lora_alpha=4,
                       fan_in_fan_out=True)
    res = shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "out")
    assert any("through its model prefix" in w and "transformer.h.0.attn.c_attn -> h.0.attn.c_attn.weight" in w
               for w in res.plan.warnings)
    check(tmp_path / "out", inst, factors, {m: 1.0 for m in mods}, 1.0, transpose=set(mods))
    # Without the flag PEFT still builds these modules as Conv1D (it sets fan_in_fan_out=True with a warning), and so
    # do we: the same output, and a warning naming the modules. (Read as nn.Linear, the square c_proj would fit the
    # wrong way round.)
    flagless = write_adapter(tmp_path / "flagless", factors, r=4, lora_alpha=4, fan_in_fan_out=False)
    res = shadowgraft.apply(instruct=trio["instruct"], adapter=flagless, output=tmp_path / "o2")
    assert any(w.startswith("fan_in_fan_out is False in adapter_config.json but 8 target module(s) are GPT-2 Conv1D "
                            "(h.0.attn.c_attn, h.0.attn.c_proj, h.0.mlp.c_fc, ...); merged with fan_in_fan_out=True there, "
                            "as PEFT does") for w in res.plan.warnings), res.plan.warnings
    check(tmp_path / "o2", inst, factors, {m: 1.0 for m in mods}, 1.0, transpose=set(mods))
    # A Llama-named instruct with GPT-2-shaped tensors: read as nn.Linear, a non-square target fits only transposed.
    llama_cfg = trio["instruct"] / "config.json"
    llama_cfg.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ShadowgraftError, match=r"'h\.0\.attn\.c_attn\.weight': instruct \(32, 96\) does not fit the adapter's "
                                               r"change \(96, 32\) \(it fits transposed: 'h\.0\.attn\.c_attn' is an nn\.Linear, "
                                               r"stored \(out, in\), going by config\.json model_type 'llama'"):
        shadowgraft.apply(instruct=trio["instruct"], adapter=flagless, output=tmp_path / "o3")


def test_embedding_lora_needs_scope_all(tmp_path):
    trio = make_trio(tmp_path / "in", shape=SHAPE)
    inst = load(trio["instruct"])
    vocab, hidden = inst["model.embed_tokens.weight"].shape
    g = torch.Generator().manual_seed(3)
    emb = {"model.embed_tokens": (torch.randn(4, vocab, generator=g), 0.01 * torch.randn(hidden, 4, generator=g))}
    lin = random_factors({"model.layers.0.self_attn.q_proj": tuple(inst["model.layers.0.self_attn.q_proj.weight"].shape)}, 4)
    # PEFT also saves base's frozen embedding next to an embedding LoRA.
    frozen = {"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(vocab, hidden)}
    ad = write_adapter(tmp_path / "lora", {**emb, **lin}, embedding={"model.embed_tokens"}, extra_tensors=frozen, r=4, lora_alpha=8)
    res = shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "lin")
    assert res.plan.grafted == ["model.layers.0.self_attn.q_proj.weight"]
    assert any("not selected by --scope linear" in w and "embed_tokens" in w for w in res.plan.warnings)
    assert any("frozen" in w for w in res.plan.warnings)
    shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "all", scope="all")
    check(tmp_path / "all", inst, {**emb, **lin}, {m: 2.0 for m in (*emb, *lin)}, 1.0, transpose={"model.embed_tokens"})


def test_include_exclude_narrow_the_adapter(tmp_path):
    trio = make_trio(tmp_path / "in", shape=SHAPE)
    inst = load(trio["instruct"])
    factors = random_factors(llama_shapes(inst), 2)
    ad = write_adapter(tmp_path / "lora", factors, r=2, lora_alpha=2)
    res = shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "o", exclude=["mlp"], dry_run=True)
    assert sorted(res.plan.grafted) == sorted(f"model.layers.{i}.{k}.weight" for i in range(2) for k in LLAMA[:4])


@pytest.mark.parametrize("case,pattern", [
    ("dora_config", r"use_dora is set: DoRA rescales"),
    ("dora_key", r"is a DoRA magnitude \(use_dora\)"),
    ("peft_type", r"peft_type 'IA3' is not supported; only LORA"),
    ("pissa", r"init_lora_weights='pissa' subtracts the initial adapter"),
    ("unknown_module", r"adapter module 'model\.layers\.7\.self_attn\.q_proj' matches no instruct tensor"),
    ("other_names", r"'x\.layers\.0\.self_attn\.q_proj' matches no instruct tensor 'x\.layers\.0\.self_attn\.q_proj\.weight' "
                    r"\(instruct has 'model\.layers\.0\.self_attn\.q_proj\.weight'"),
    ("stray_key", r"key 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.scales' is not a LoRA factor"),
    ("modules_to_save", r"is a whole module trained on base \(modules_to_save=\['lm_head'\]\)"),
    ("bias", r"is a bias trained on base \(bias='all'\)"),
    ("shape", r"'model\.layers\.0\.self_attn\.q_proj\.weight': instruct \(64, 64\) does not fit the adapter's change \(64, 32\)"),
    ("rank", r"factors have rank 4/4 but adapter_config\.json gives r=8"),
    ("no_prefix", r"does not start with 'base_model\.model\.'"),
])
def test_refusals_exit_1_with_one_line(tmp_path, capsys, case, pattern):
    trio = make_trio(tmp_path / "in", shape=SHAPE)
    q = "model.layers.0.self_attn.q_proj"
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    factors, cfg, extra = {q: (a, b)}, {"r": 4, "lora_alpha": 8}, {}
    if case == "dora_config":
        cfg["use_dora"] = True
    elif case == "dora_key":
        extra = {f"base_model.model.{q}.lora_magnitude_vector": torch.ones(64)}
    elif case == "peft_type":
        cfg["peft_type"] = "IA3"
    elif case == "pissa":
        cfg["init_lora_weights"] = "pissa"
    elif case == "unknown_module":
        factors["model.layers.7.self_attn.q_proj"] = (a, b)
    elif case == "other_names":
        factors = {"x.layers.0.self_attn.q_proj": (a, b)}
    elif case == "stray_key":
        extra = {f"base_model.model.{q}.scales": torch.ones(64)}
    elif case == "modules_to_save":
        cfg["modules_to_save"] = ["lm_head"]
        extra = {"base_model.model.lm_head.weight": torch.zeros(128, 64)}
    elif case == "bias":
        cfg["bias"] = "all"
        extra = {f"base_model.model.{q}.base_layer.bias": torch.zeros(64)}
    elif case == "shape":
        factors = {q: (torch.randn(4, 32), b)}
    elif case == "rank":
        cfg["r"] = 8
    ad = write_adapter(tmp_path / "lora", factors, extra_tensors=extra, **cfg)
    if case == "no_prefix":
        save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": a}, str(ad / "adapter_model.safetensors"))
    code, _, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--adapter", ad, "--output", tmp_path / "out")
    assert code == 1
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    import re

    assert re.search(pattern, " ".join(err.split())), err
    assert not (tmp_path / "out").exists()


def test_missing_or_pickle_adapter(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_adapter(tmp_path / "nope")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (tmp_path / "pk" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(ShadowgraftError, match="pickle checkpoints are never loaded"):
        open_adapter(tmp_path / "pk")


def test_peft_merge_and_unload_equals_ours(tmp_path):
    """PEFT itself merges the same adapter into the same model; we match it, and the float64 reference built
    from PEFT's own per-module scaling (so our reading of rsLoRA / rank_pattern / embeddings is PEFT's)."""
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float()
    inst_dir = tmp_path / "instruct"
    model.save_pretrained(inst_dir, safe_serialization=True)
    lcfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=True,
                      rank_pattern={"down_proj": 6}, alpha_pattern={"layers.1.self_attn.v_proj": 5},
                      init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, lcfg)
    scaling = {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in peft_model.named_modules()
               if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    assert len(scaling) == 2 * 3 + 1 and len(set(scaling.values())) == 3  # 12/2, 12/sqrt(6), 5/2
    peft_model.save_pretrained(tmp_path / "lora")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    shadowgraft.apply(instruct=inst_dir, adapter=tmp_path / "lora", output=tmp_path / "out", scope="all")
    got, inst = load(tmp_path / "out"), load(inst_dir)
    sd = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    for module, s in scaling.items():
        name, key = f"{module}.weight", f"base_model.model.{module}"
        if "embed" in module:
            d = (sd[key + ".lora_embedding_B"].double() @ sd[key + ".lora_embedding_A"].double()).T
        else:
            d = sd[key + ".lora_B.weight"].double() @ sd[key + ".lora_A.weight"].double()
        assert_exact(got[name], inst[name].double() + s * d)
    assert {n for n in got if not torch.equal(got[n], inst[n])} == {f"{m}.weight" for m in scaling}
    for n in got:
        # PEFT adds an fp32 delta in fp32 (several roundings); we round once from fp64.
        torch.testing.assert_close(got[n], merged[n], rtol=1e-5, atol=1e-6)


def test_adapter_from_hub_cache_offline(tmp_path, monkeypatch):
    from .test_hub import to_cache

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trio = make_trio(tmp_path / "in", shape=SHAPE)
    inst = load(trio["instruct"])
    factors = random_factors(llama_shapes(inst, kinds=LLAMA[:2]), 4)
    ad = write_adapter(tmp_path / "lora", factors, r=4, lora_alpha=8)
    (ad / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    to_cache(cache, "me/lora", ad, "c3" * 20)
    res = shadowgraft.apply(instruct=trio["instruct"], adapter="me/lora", output=tmp_path / "out")
    check(tmp_path / "out", inst, factors, {m: 2.0 for m in factors}, 1.0)
    meta = json.loads((tmp_path / "out" / "shadowgraft.json").read_text())
    assert meta["inputs"]["adapter"]["repo_id"] == "me/lora" and meta["inputs"]["adapter"]["commit"] == "c3" * 20
    assert len(res.plan.grafted) == 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_adapter_matches_float64_reference(tmp_path, dtype):
    trio = make_trio(tmp_path / "in", shape=SHAPE, dtype=dtype)
    inst = load(trio["instruct"])
    factors = random_factors(llama_shapes(inst), 8)
    ad = write_adapter(tmp_path / "lora", factors, r=8, lora_alpha=16, use_rslora=True)
    shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "out", alpha=0.6, device="cuda")
    check(tmp_path / "out", inst, factors, {m: 16 / math.sqrt(8) for m in factors}, 0.6)


@pytest.mark.parametrize("key, text, shown", [
    ("lora_alpha", "NaN", "lora_alpha is nan"),
    ("lora_alpha", "1e400", "lora_alpha is inf"),  # json reads an overflowing literal as inf
    ("lora_alpha", "-Infinity", "lora_alpha is -inf"),
    ("lora_alpha", "0", "lora_alpha is 0"),
    ("lora_alpha", "-8", "lora_alpha is -8"),
    ("lora_alpha", "true", "lora_alpha is True"),
    ("lora_alpha", '"8"', "lora_alpha is '8'"),
    ("r", "0", "r is 0"),
    ("r", "-4", "r is -4"),
    ("r", "4.0", "r is 4.0"),
    ("rank_pattern", '{"q_proj": 0}', "rank_pattern['q_proj'] is 0"),
    ("alpha_pattern", '{"q_proj": NaN}', "alpha_pattern['q_proj'] is nan"),
    ("alpha_pattern", '{"layers.0.self_attn.q_proj": 1e999}', "alpha_pattern['layers.0.self_attn.q_proj'] is inf"),
])
def test_config_numbers_must_be_finite_and_positive(tmp_path, capsys, key, text, shown):
    trio = make_trio(tmp_path / "in", shape=SHAPE)
    q = "model.layers.0.self_attn.q_proj"
    ad = write_adapter(tmp_path / "lora", {q: (torch.randn(4, 64), torch.randn(64, 4))}, r=4, lora_alpha=8)
    cfg = ad / "adapter_config.json"
    # Written as text: json.dumps cannot write 1e400, and NaN must reach the reader as the file spells it.
    cfg.write_text(cfg.read_text().replace(f'"{key}": ' + json.dumps(json.loads(cfg.read_text())[key]), f'"{key}": {text}'))
    assert f'"{key}": {text}' in cfg.read_text()
    code, _, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--adapter", ad, "--output", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {cfg}: {shown}; "), err
    assert not (tmp_path / "out").exists()


def saved_llama(tmp_path, *, layers: int):
    """A small fp32 Llama saved as ``tmp_path/instruct``, and a function loading a fresh copy of it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    inst_dir = tmp_path / "instruct"
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(inst_dir, safe_serialization=True)
    return inst_dir, lambda: transformers.LlamaForCausalLM.from_pretrained(inst_dir, dtype=torch.float32)


def test_fan_in_fan_out_on_linear_targets_merges_as_peft_does(tmp_path):
    """A Llama adapter whose config says fan_in_fan_out: true. PEFT builds its targets as nn.Linear, resets the flag
    to False with a warning and merges B @ A untransposed; the square q_proj / o_proj would also fit transposed."""
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    inst_dir, fresh_model = saved_llama(tmp_path, layers=2)
    model = fresh_model()
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                                                      init_lora_weights=False, lora_dropout=0.0, fan_in_fan_out=True))
    peft_model.save_pretrained(tmp_path / "lora")
    # PEFT saved the flag it reset; the config as its author wrote it says true.
    f = tmp_path / "lora" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        loaded = PeftModel.from_pretrained(fresh_model(), tmp_path / "lora")
    merged = {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}

    res = shadowgraft.apply(instruct=inst_dir, adapter=tmp_path / "lora", output=tmp_path / "out")
    assert any(w.startswith("fan_in_fan_out is True in adapter_config.json but 6 target module(s) are torch.nn.Linear "
                            "(model.layers.0.mlp.down_proj, ") and w.endswith("merged with fan_in_fan_out=False there, as PEFT does")
               for w in res.plan.warnings), res.plan.warnings
    got, inst = load(tmp_path / "out"), load(inst_dir)
    sd = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    targets = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    assert inst["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)  # square: a transposed merge would fit
    for module in targets:
        key = f"base_model.model.{module}"
        d = sd[key + ".lora_B.weight"].double() @ sd[key + ".lora_A.weight"].double()
        assert_exact(got[f"{module}.weight"], inst[f"{module}.weight"].double() + 2.0 * d)
    assert {n for n in got if not torch.equal(got[n], inst[n])} == {f"{m}.weight" for m in targets}
    for n in got:
        torch.testing.assert_close(got[n], merged[n], rtol=1e-5, atol=1e-6)


def test_layer_and_exclude_options_follow_peft_and_a_config_that_contradicts_its_weights_is_refused(tmp_path):
    """layers_to_transform / exclude_modules as PEFT saves them merge as PEFT merges; the same weights under an edited
    config that PEFT would read differently (it would not merge some of them) are refused, not merged silently."""
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    inst_dir, fresh_model = saved_llama(tmp_path, layers=3)
    model = fresh_model()
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1, 2],
                      exclude_modules=["model.layers.2.self_attn.v_proj"], init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model, lcfg).save_pretrained(tmp_path / "lora")
    merged = PeftModel.from_pretrained(fresh_model(), tmp_path / "lora").merge_and_unload().state_dict()
    shadowgraft.apply(instruct=inst_dir, adapter=tmp_path / "lora", output=tmp_path / "out")
    got, inst = load(tmp_path / "out"), load(inst_dir)
    changed = {n for n in got if not torch.equal(got[n], inst[n])}
    assert changed == {n for n in inst if not torch.equal(merged[n], inst[n])} and len(changed) == 5
    for n in got:
        torch.testing.assert_close(got[n], merged[n], rtol=1e-5, atol=1e-6)

    f = tmp_path / "lora" / "adapter_config.json"
    saved = json.loads(f.read_text())
    # What PEFT also accepts for these weights: every layer ([]), and a module named in full, to which PEFT applies
    # no layer rule.
    for edit in ({"layers_to_transform": []},
                 {"target_modules": [m.removesuffix(".weight") for m in changed], "layers_to_transform": [0]}):
        f.write_text(json.dumps({**saved, **edit, "exclude_modules": None}))
        shadowgraft.apply(instruct=inst_dir, adapter=tmp_path / "lora", output=tmp_path / "ok", overwrite=True)
        assert {n for n, t in load(tmp_path / "ok").items() if not torch.equal(t, inst[n])} == changed
    for edit, why in [({"layers_to_transform": [2]}, "layers_to_transform [2] leaves it out"),
                      ({"target_modules": ["nonexistent_proj"]}, "target_modules ['nonexistent_proj'] does not name it"),
                      ({"exclude_modules": ["q_proj"]}, "exclude_modules ['q_proj'] names it"),
                      ({"target_modules": r".*layers\.2\..*q_proj"}, "does not name it")]:
        f.write_text(json.dumps({**saved, **edit}))
        with pytest.raises(ShadowgraftError, match=rf"has LoRA factors but adapter_config.json's .*{re.escape(why)}, so PEFT "
                                                   "would not merge them; the config does not match the weights"):
            shadowgraft.apply(instruct=inst_dir, adapter=tmp_path / "lora", output=tmp_path / "out2")
