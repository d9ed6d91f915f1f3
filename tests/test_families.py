"""Every family of the zoo (tests/zoo.py), as transformers writes it: apply, stats and apply --adapter.

The expected graft scope is computed here from the documented rule (README,
"What the default grafts"), not by calling naming.py; values are checked
against float64 references and the outputs are loaded back with the same
transformers class.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

import shadowgraft  # noqa: E402
from shadowgraft.errors import ShadowgraftError  # noqa: E402
from tests.conftest import assert_exact, load, ulp_distance  # noqa: E402
from tests.zoo import FAMILIES, build_trio, model_class, text_model, text_only  # noqa: E402

NAMES = list(FAMILIES)
MULTIMODAL = [n for n, f in FAMILIES.items() if f.multimodal]

# The documented rule, written out independently of naming.py.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.")
_TOWER_PREFIXES = {"vision": ("vision_tower.", "visual.", "vision_model."), "projector": ("multi_modal_projector.",)}


def _is_norm_or_embed(name: str) -> bool:
    parts = name.lower().split(".")
    return any("norm" in p or p.startswith("ln_") or "embed" in p or p in ("wte", "wpe") for p in parts)


def expected_scope(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Floating tensors with >= 2 dims in a numbered block, not norms or embeddings; plus their biases."""
    mats = {n for n, t in tensors.items() if t.is_floating_point() and t.dim() >= 2 and _BLOCK.search(n)
            and not _is_norm_or_embed(n)}
    biases = set()
    for n in tensors:
        if n.endswith(".bias") and n[: -len(".bias")] + ".weight" in mats:
            biases.add(n)
        elif n.endswith("_bias") and {n[: -len("_bias")], n[: -len("_bias")] + "_weight"} & mats:
            biases.add(n)
    return mats | biases


def tower_of(name: str) -> str:
    return next((t for t, ps in _TOWER_PREFIXES.items() if name.startswith(ps)), "language")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """``zoo(name)`` -> the family's base/instruct/tuned folders, built once per session."""
    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in built:
            built[name] = build_trio(FAMILIES[name], root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def text_tuned(zoo, tmp_path_factory):
    """``text_tuned(name)``: the multimodal tuned model's language model saved as a text-only CausalLM."""
    root = tmp_path_factory.mktemp("text")
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            built[name] = text_only(FAMILIES[name], zoo(name)["tuned"], root / name)
        return built[name]

    return get


def _check_graft(out, trio_tensors: dict[str, dict[str, torch.Tensor]], grafted: set[str], rename=lambda n: n):
    """Grafted tensors within 1 ulp of I + (T - B) in float64 (>= 99.99% exact); every other tensor byte for byte."""
    got, ins, base = load(out), trio_tensors["instruct"], trio_tensors["base"]
    tuned = trio_tensors["tuned"]
    assert set(got) == set(ins)
    for n, t in got.items():
        assert t.dtype == ins[n].dtype, n
        if n in grafted:
            ref = ins[n].double() + (tuned[rename(n)].double() - base[n].double())
            assert_exact(t, ref)
            assert not torch.equal(t, ins[n]), f"{n} was not changed"
        else:
            assert torch.equal(t.view(torch.uint8) if t.dtype != torch.bool else t,
                               ins[n].view(torch.uint8) if t.dtype != torch.bool else ins[n]), n


def _loads_cleanly(fam, folder):
    model, info = model_class(fam.cls).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@pytest.mark.parametrize("name", NAMES)
def test_apply_grafts_exactly_the_structural_scope(name, zoo, tmp_path):
    fam, trio = FAMILIES[name], zoo(name)
    tensors = {k: load(v) for k, v in trio.items()}
    want = expected_scope(tensors["instruct"])
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    assert set(res.plan.grafted) == want
    # Every family has attention and MLP matrices in scope; multimodal ones their vision blocks too.
    assert any("attn" in n for n in want) and any(re.search(r"mlp|feed_forward|block_sparse_moe", n) for n in want)
    if fam.multimodal:
        assert {tower_of(n) for n in want} == {"language", "vision"}
    _check_graft(tmp_path / "out", tensors, want)
    _loads_cleanly(fam, tmp_path / "out")


@pytest.mark.parametrize("name", NAMES)
def test_stats_headline_is_the_language_models_blocks(name, zoo):
    trio = zoo(name)
    a, b = load(trio["base"]), load(trio["instruct"])

    def sigma(n):
        x, y = a[n].double(), b[n].double()
        return float((x - y).abs().sum() / (x.abs().sum() + y.abs().sum()))

    r = shadowgraft.stats(trio["base"], trio["instruct"])
    per_tower: dict[str, list[float]] = {}
    for n in a:
        if _BLOCK.search(n) and a[n].is_floating_point():
            per_tower.setdefault(tower_of(n), []).append(sigma(n))
    lang = per_tower.pop("language")
    assert r.summary.sigma_mean == pytest.approx(sum(lang) / len(lang), rel=1e-6)
    assert r.summary.n_tensors == len(lang)
    for t, sig in per_tower.items():
        assert r.summary.towers[t]["sigma_mean"] == pytest.approx(sum(sig) / len(sig), rel=1e-6)
        assert r.summary.towers[t]["n_tensors"] == len(sig)
    # Layers are keyed by (tower, index): vision block 0 never merges with text layer 0.
    keys = [(g.tower, g.key) for g in r.layers]
    assert len(keys) == len(set(keys))
    if FAMILIES[name].multimodal:
        assert ("vision", 0) in keys and ("language", 0) in keys
        assert "language model" in r.summary.verdict and "vision" in r.summary.verdict
        data = json.loads(r.to_json())
        assert {"vision", "language"} <= set(data["summary"]["towers"])
        assert {row["tower"] for row in data["layers"]} >= {"vision", "language"}
        assert "tower" in r.to_csv().splitlines()[0].split(",")


def _peft_adapter(fam, trio, folder, target_modules=None, **kw):
    """A PEFT LoRA (r=4) on base's language model: all its Linear / Conv1D modules but lm_head, named one by one,
    or ``target_modules`` as given ("all-linear"); ``kw`` goes to LoraConfig."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lm = text_model(fam, trio["base"], dtype=torch.float32)
    from transformers.pytorch_utils import Conv1D

    # Full module names: a suffix like down_proj would also pull in the experts' down_proj parameter. PEFT 0.21
    # still adds the fused expert parameters (target_parameters) on DeepSeek-V3, for its dense mlp.gate_proj.
    names = sorted(n for n, m in lm.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and "lm_head" not in n)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules or names, init_lora_weights=False,
                          **kw)
    model = peft.get_peft_model(lm, cfg)
    model.save_pretrained(folder)
    return folder


def _saved(model, folder) -> dict[str, torch.Tensor]:
    model.save_pretrained(folder)
    return load(folder)


def _check_adapter(name, trio, ad, tmp_path):
    """apply --adapter against PEFT's own merge in float64, both saved by transformers and compared by file name.

    transformers writes fused experts back as the files' per-expert tensors, so a LoRA on a fused expert
    parameter is checked on exactly the tensors apply wrote.
    """
    peft = pytest.importorskip("peft")
    fam = FAMILIES[name]
    res = shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "out")
    assert res.plan.grafted
    _loads_cleanly(fam, tmp_path / "out")
    merged = peft.PeftModel.from_pretrained(text_model(fam, trio["instruct"], dtype=torch.float64), ad).merge_and_unload()
    merged = _saved(merged, tmp_path / "merged")
    ours = _saved(text_model(fam, tmp_path / "out"), tmp_path / "ours")
    # bf16 as written: DeepSeek-V3 keeps its router in fp32 once loaded (exactly the bf16 values, so this cast is too).
    ours = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in ours.items()}
    before = _saved(text_model(fam, trio["instruct"], dtype=torch.float64), tmp_path / "before")
    assert set(ours) == set(merged) == set(before)
    changed = set()
    for n, ref in merged.items():
        # float64 but DeepSeek-V3's router, which transformers keeps in fp32 whatever dtype it loads in.
        ref, before[n] = ref.double(), before[n].double()
        if torch.equal(ref, before[n]):
            assert torch.equal(ours[n].double(), before[n]), n
            continue
        changed.add(n)
        # Rounded once from fp32 work: 99% bit-exact against the exact merge; the rest within one bf16 step, or
        # within fp32's error on the LoRA term where instruct and the term cancel.
        d = ulp_distance(ours[n], ref)
        assert float((d == 0).double().mean()) >= 0.99, n
        torch.testing.assert_close(ours[n].double(), ref, rtol=2**-7, atol=1e-6 * float((ref - before[n]).abs().max()), msg=n)
    assert len(changed) == len(res.plan.grafted)
    return res, changed


@pytest.mark.parametrize("name", NAMES)
def test_adapter_matches_peft_merge(name, zoo, tmp_path, one_torch_thread):
    fam, trio = FAMILIES[name], zoo(name)
    res, _ = _check_adapter(name, trio, _peft_adapter(fam, trio, tmp_path / "lora"), tmp_path)
    record = json.loads((tmp_path / "out" / "shadowgraft.json").read_text())
    if fam.multimodal and name != "qwen2.5-vl":
        assert record["renamed"] == {"adapter": {"from": "", "to": "language_model."}}
        assert all(n.startswith("language_model.") for n in res.plan.grafted)


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral", "deepseek-v3"])
def test_all_linear_adapter_on_fused_experts(name, zoo, tmp_path, one_torch_thread):
    # "all-linear" on a transformers 5 MoE: PEFT puts LoRA on the fused expert parameters and the router weight
    # (target_parameters); each expert's change lands on its own gate/up/down (Mixtral: w1/w3/w2) file tensor.
    fam, trio = FAMILIES[name], zoo(name)
    ad = _peft_adapter(fam, trio, tmp_path / "lora", target_modules="all-linear")
    config = json.loads((ad / "adapter_config.json").read_text())
    assert {"gate_up_proj", "down_proj", "gate.weight"} <= set(config["target_parameters"])
    res, changed = _check_adapter(name, trio, ad, tmp_path)
    moe = "block_sparse_moe" if name == "mixtral" else "mlp"
    parts = ("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    want = {f"model.layers.1.{moe}.experts.{e}.{p}.weight" for e in range(4) for p in parts} | {f"model.layers.1.{moe}.gate.weight"}
    assert want <= changed


@pytest.mark.parametrize("name", MULTIMODAL)
def test_text_only_tune_onto_multimodal_instruct(name, zoo, text_tuned, tmp_path, capsys):
    fam, trio = FAMILIES[name], zoo(name)
    tuned = text_tuned(name)
    tensors = {"base": load(trio["base"]), "instruct": load(trio["instruct"]), "tuned": load(tuned)}
    # Qwen2.5-VL files already name the decoder as Qwen2 does; LLaVA and Gemma 3 add language_model.
    prefix = "" if name == "qwen2.5-vl" else "language_model."
    want = {n for n in expected_scope(tensors["instruct"]) if tower_of(n) == "language"}
    from tests.conftest import run_cli

    code, out, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--base", trio["base"], "--tuned", tuned,
                             "--output", tmp_path / "out", "--dry-run")
    assert code == 0, err
    if prefix:
        assert "tuned's tensor names pair with instruct's under prefix change '' -> 'language_model.'" in " ".join(err.split())
    assert "tower(s) absent from tuned (vision) keep instruct's values" in " ".join(err.split())
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=tuned, output=tmp_path / "out")
    assert set(res.plan.grafted) == want
    _check_graft(tmp_path / "out", tensors, want, rename=lambda n: n[len(prefix):])
    _loads_cleanly(fam, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "shadowgraft.json").read_text())
    assert record.get("renamed", {}) == ({"tuned": {"from": "", "to": prefix}} if prefix else {})
    # stats pairs the text-only tune the same way, and reports the vision tower from A and B alone.
    r = shadowgraft.stats(trio["base"], trio["instruct"], tuned=tuned)
    assert r.renamed == ({"tuned": {"from": "", "to": prefix}} if prefix else {})
    assert not r.tuned_missing
    assert {x.name for x in r.tensors if x.delta is not None} == {n for n in tensors["base"] if tower_of(n) == "language"}
    # A text-only base against the multimodal instruct: the text side takes the multimodal names.
    r2 = shadowgraft.stats(tuned, trio["instruct"])
    assert not r2.only_in_a and all(x.tower == "language" for x in r2.tensors)


def test_partial_text_only_tune_is_refused(zoo, text_tuned, tmp_path):
    from safetensors.torch import load_file, save_file

    trio, tuned = zoo("llava"), text_tuned("llava")
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in tuned.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    t = load_file(str(cut / "model.safetensors"))
    t["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(t, str(cut / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ShadowgraftError, match=r"tuned's tensor names match instruct's only in part under prefix change "
                                               r"'' -> 'language_model\.': 1 of 22 tuned tensor\(s\) have no partner: "
                                               r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=cut, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_on_experts_stored_fused(zoo, tmp_path, one_torch_thread):
    # Llama 4 files hold the fused (E, ., .) expert tensors themselves: the change goes on as PEFT adds it,
    # expert e taking B's columns e, e+E, ... and A's rows [e*r, (e+1)*r).
    fam, trio = FAMILIES["llama4-text"], zoo("llama4-text")
    ad = _peft_adapter(fam, trio, tmp_path / "lora", target_parameters=["feed_forward.experts.gate_up_proj",
                                                                          "feed_forward.experts.down_proj"])
    _, changed = _check_adapter("llama4-text", trio, ad, tmp_path)
    assert {"model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.1.feed_forward.experts.down_proj"} <= changed
