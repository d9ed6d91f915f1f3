"""End-to-end ``shadowgraft.apply`` against a float64 reference."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import shadowgraft
from shadowgraft import ShadowgraftError
from shadowgraft.synthetic import Shape, bert_tensors, gpt2_tensors, make_trio

from .conftest import assert_exact, load

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference(trio, alpha):
    i, t, b = (load(trio[k]) for k in ("instruct", "tuned", "base"))
    return i, {n: i[n].double() + alpha * (t[n].double() - b[n].double()) for n in i}


@pytest.mark.parametrize("alpha", [1.0, 0.37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_graft_matches_float64_reference(tmp_path, alpha, dtype):
    trio = make_trio(tmp_path / "in", shape=Shape(layers=2, hidden=64, intermediate=96, vocab=128), dtype=dtype, shard_bytes=60_000)
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out", alpha=alpha)
    inst, ref = reference(trio, alpha)
    got = load(tmp_path / "out")
    assert set(got) == set(inst)
    grafted = set(res.plan.grafted)
    assert grafted == {n for n in inst if any(p in n for p in LINEAR)}
    for n, y in got.items():
        assert y.dtype == inst[n].dtype
        if n in grafted:
            assert_exact(y, ref[n])
            assert not torch.equal(y, inst[n])
        else:
            assert torch.equal(y.view(torch.uint8), inst[n].view(torch.uint8)) if y.dtype != torch.float32 else torch.equal(y, inst[n])


def test_sharded_output_mirrors_instruct_and_index_is_consistent(tmp_path, trio):
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    src = json.loads((trio["instruct"] / "model.safetensors.index.json").read_text())
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert idx["weight_map"] == src["weight_map"]
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load(tmp_path / "out").values())
    for f in set(idx["weight_map"].values()):
        assert (tmp_path / "out" / f).stat().st_size == (trio["instruct"] / f).stat().st_size
    assert (tmp_path / "out" / "config.json").read_text() == (trio["instruct"] / "config.json").read_text()
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    meta = json.loads((tmp_path / "out" / "shadowgraft.json").read_text())
    assert meta["alpha"] == 1.0 and meta["scope"] == "linear" and len(meta["grafted"]) == 3 * 7


def test_reshard_and_single_file_inputs(tmp_path, trio):
    single = make_trio(tmp_path / "one", shape=Shape(layers=3, hidden=64, intermediate=96, vocab=128))
    out = tmp_path / "out"
    shadowgraft.apply(instruct=single["instruct"] / "model.safetensors", base=trio["base"], tuned=trio["tuned"], output=out,
                      max_shard_size="100KB")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(idx["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    got, inst = load(out), load(single["instruct"])
    assert set(got) == set(inst)
    # A bare file brings no config to copy.
    assert not (out / "config.json").exists()


def test_tied_embeddings_stay_tied(tmp_path):
    trio = make_trio(tmp_path / "in", shape=Shape(tie=True))
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    got = load(tmp_path / "out")
    assert "lm_head.weight" not in got
    assert torch.equal(got["model.embed_tokens.weight"], load(trio["instruct"])["model.embed_tokens.weight"])


def test_bert_fp32_graft(tmp_path):
    trio = make_trio(tmp_path / "in", names=list(bert_tensors()), dtype=torch.float32)
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    inst, ref = reference(trio, 1.0)
    got = load(tmp_path / "out")
    for n in res.plan.grafted:
        assert_exact(got[n], ref[n])
    assert all("LayerNorm" not in n and "embeddings" not in n and "pooler" not in n for n in res.plan.grafted)
    assert len(res.plan.grafted) == 2 * 12  # 6 linear modules x (weight, bias) x 2 layers


def test_gpt2_scope_split(tmp_path):
    trio = make_trio(tmp_path / "in", names=list(gpt2_tensors()), dtype=torch.float32)
    kw = dict(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o", dry_run=True)
    attn = set(shadowgraft.apply(**kw, scope="attn").plan.grafted)
    mlp = set(shadowgraft.apply(**kw, scope="mlp").plan.grafted)
    lin = set(shadowgraft.apply(**kw).plan.grafted)
    assert attn == {f"h.{i}.attn.{m}.{p}" for i in range(2) for m in ("c_attn", "c_proj") for p in ("weight", "bias")}
    assert mlp == {f"h.{i}.mlp.{m}.{p}" for i in range(2) for m in ("c_fc", "c_proj") for p in ("weight", "bias")}
    assert lin == attn | mlp
    assert not (tmp_path / "o").exists()


def test_include_exclude(tmp_path, trio):
    kw = dict(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o", dry_run=True)
    only = shadowgraft.apply(**kw, include=[r"layers\.1\."], exclude=["down_proj"]).plan.grafted
    assert sorted(only) == sorted(f"model.layers.1.{m}.weight" for m in
                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))
    everything = shadowgraft.apply(**kw, scope="all").plan.grafted
    assert "model.embed_tokens.weight" in everything and "model.norm.weight" in everything


def test_dtype_override_casts_everything(tmp_path, trio):
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o", dtype="float32")
    inst, ref = reference(trio, 1.0)
    got = load(tmp_path / "o")
    assert all(t.dtype == torch.float32 for t in got.values())
    assert torch.equal(got["model.norm.weight"], inst["model.norm.weight"].float())
    assert_exact(got["model.layers.0.mlp.up_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"])


def test_existing_output_refused_then_overwritten(tmp_path, trio):
    # An earlier output (it holds shadowgraft.json); a folder without that mark is never replaced (test_writer).
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00003-of-00003.safetensors").write_text("a shard of an earlier, other sharding")
    (out / "shadowgraft.json").write_text("{}")
    with pytest.raises(ShadowgraftError, match="already exists; pass --overwrite"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=out)
    # What the user added since is not ours to delete, even in our folder.
    (out / "eval").mkdir()
    (out / "eval" / "results.jsonl").write_text("{}\n")
    (out / "notes.md").write_text("x")
    with pytest.raises(ShadowgraftError, match=r"also holds eval, notes\.md, which shadowgraft did not write; "
                                               "--overwrite will not delete them"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=out, overwrite=True)
    assert (out / "notes.md").exists() and (out / "eval" / "results.jsonl").exists()
    shutil.rmtree(out / "eval")
    (out / "notes.md").unlink()
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=out, overwrite=True)
    assert not (out / "model-00003-of-00003.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shape_mismatch_names_tensor_and_leaves_nothing(tmp_path, trio):
    other = make_trio(tmp_path / "other", shape=Shape(layers=3, hidden=64, intermediate=128, vocab=128))
    with pytest.raises(ShadowgraftError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight': instruct \(96, 64\) != tuned \(128, 64\)"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=other["tuned"], output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Excluding the mismatched tensors makes it go through.
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=other["tuned"], output=tmp_path / "out",
                      exclude=["mlp"])


def test_many_tuned_checkpoints_in_one_pass(tmp_path, trio):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trio["tuned"], run / "checkpoint-20")
    shutil.copytree(trio["base"], run / "checkpoint-100")  # a "tuned" equal to base grafts to instruct itself
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=run, output=tmp_path / "out")
    assert [p.name for p in res.outputs] == ["checkpoint-20", "checkpoint-100"]
    single = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "single")
    for f in single.output.glob("*.safetensors"):
        assert (tmp_path / "out" / "checkpoint-20" / f.name).read_bytes() == f.read_bytes()
    same = load(tmp_path / "out" / "checkpoint-100")
    inst = load(trio["instruct"])
    assert all(torch.equal(same[n], inst[n]) for n in inst)
    meta = json.loads((tmp_path / "out" / "checkpoint-100" / "shadowgraft.json").read_text())
    assert meta["inputs"]["tuned"]["source"].endswith("checkpoint-100")


def test_one_bad_tuned_checkpoint_fails_alone(tmp_path, trio):
    import shutil

    other = make_trio(tmp_path / "other", shape=Shape(layers=3, hidden=64, intermediate=128, vocab=128))
    shutil.copytree(trio["tuned"], tmp_path / "run" / "checkpoint-1")
    shutil.copytree(other["tuned"], tmp_path / "run" / "checkpoint-2")
    with pytest.raises(ShadowgraftError, match=r"1 of 2 tuned checkpoints failed \(the other outputs are complete\): .*checkpoint-2: .*instruct \(96, 64\) != tuned \(128, 64\)"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=str(tmp_path / "run" / "checkpoint-*"), output=tmp_path / "out")
    assert (tmp_path / "out" / "checkpoint-1" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_cuda_requested_without_gpu_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trio = make_trio(tmp_path / "in")
    with pytest.raises(shadowgraft.ShadowgraftError, match="--device cuda was asked for but torch sees no CUDA device"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o", device="cuda")


def test_python_call_records_the_equivalent_command(tmp_path, trio):
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o",
                      alpha=0.5, exclude=["down_proj"])
    meta = json.loads((tmp_path / "o" / "shadowgraft.json").read_text())
    assert meta["command"] == (f"shadowgraft apply --instruct {trio['instruct']} --base {trio['base']} --tuned {trio['tuned']} "
                               f"--output {tmp_path / 'o'} --alpha 0.5 --exclude down_proj")


def test_adapter_passed_as_delta_is_named(tmp_path, trio):
    ad = tmp_path / "lora"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 64)}, str(ad / "adapter_model.safetensors"))
    with pytest.raises(ShadowgraftError, match=r"lora: is a PEFT adapter \(adapter_config.json\), not a delta; pass it with --adapter"):
        shadowgraft.apply(instruct=trio["instruct"], delta=ad, output=tmp_path / "o")


def test_alpha_grid_writes_one_exact_output_per_value_reading_inputs_once(tmp_path, trio):
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "grid",
                            alpha="0.25,0.5,1.0")
    assert [r.output.name for r in res.results] == ["alpha-0.25", "alpha-0.5", "alpha-1.0"]
    for r in res.results:
        inst, ref = reference(trio, r.alpha)
        got = load(r.output)
        for n in r.plan.grafted:
            assert_exact(got[n], ref[n])
        meta = json.loads((r.output / "shadowgraft.json").read_text())
        assert meta["alpha"] == r.alpha
        assert f"| alpha | {r.alpha} |" in (r.output / "README.md").read_text()
    # Byte-identical to a graft of the same alpha alone.
    alone = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "alone", alpha=0.5)
    for f in alone.output.glob("*.safetensors"):
        assert (tmp_path / "grid" / "alpha-0.5" / f.name).read_bytes() == f.read_bytes()
    # Each input byte is read once for all three outputs.
    assert res.stats.bytes_read == pytest.approx(alone.stats.bytes_read, rel=0.001)


def test_alpha_grid_with_several_tuned_nests_outputs(tmp_path, trio):
    import shutil

    shutil.copytree(trio["tuned"], tmp_path / "run" / "checkpoint-1")
    shutil.copytree(trio["tuned"], tmp_path / "run" / "checkpoint-2")
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=tmp_path / "run", output=tmp_path / "out",
                            alpha=[0.5, 2.0])
    assert sorted(str(r.output.relative_to((tmp_path / "out").absolute())) for r in res.results) == [
        "checkpoint-1/alpha-0.5", "checkpoint-1/alpha-2.0", "checkpoint-2/alpha-0.5", "checkpoint-2/alpha-2.0"]


def test_alpha_for_sets_alpha_per_tensor_first_rule_wins(tmp_path, trio):
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o",
                            alpha=0.5, alpha_for=[r"layers\.0\..*mlp=0.0", r"mlp=2.0", r"q_proj=-1"])
    i, t, b = (load(trio[k]) for k in ("instruct", "tuned", "base"))
    got = load(tmp_path / "o")
    want = {}
    for n in res.plan.grafted:
        a = 0.0 if ("layers.0." in n and "mlp" in n) else 2.0 if "mlp" in n else -1.0 if "q_proj" in n else 0.5
        want[n] = a
        assert_exact(got[n], i[n].double() + a * (t[n].double() - b[n].double()))
    assert {it.name: it.alpha for it in res.plan.items if it.action == "graft"} == want
    meta = json.loads((tmp_path / "o" / "shadowgraft.json").read_text())
    assert meta["alpha_for"][0] == {"regex": r"layers\.0\..*mlp", "alpha": 0.0}
    assert meta["alphas"] == {n: a for n, a in want.items() if a != 0.5}
    assert "--alpha-for" in meta["command"]
    assert r"| alpha per tensor (first matching regex wins) | `layers\.0\..*mlp` -> 0.0; `mlp` -> 2.0" in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.parametrize("bad, msg", [("0.5,x", r"--alpha '0.5,x': give numbers"), ("nan", r"--alpha must be finite"),
                                      ("0.5,0.5", r"a value is repeated")])
def test_bad_alpha_values_are_refused(tmp_path, trio, bad, msg):
    with pytest.raises(ShadowgraftError, match=msg):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o", alpha=bad)
    with pytest.raises(ShadowgraftError, match=r"--alpha-for 'mlp\(': write|not a valid regular expression"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o",
                          alpha_for=["mlp(=1"])
    assert not (tmp_path / "o").exists()


def _poisoned_copy(src, dst, name, value):
    """A copy of checkpoint folder ``src`` with element 0 of tensor ``name`` set to ``value``."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    f = dst / idx[name]
    tensors = load(f)
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_nan_in_one_tuned_checkpoint_is_recorded_in_its_output_only(tmp_path, trio):
    bad = "model.layers.1.mlp.up_proj.weight"
    _poisoned_copy(trio["tuned"], tmp_path / "run" / "checkpoint-2", bad, float("nan"))
    import shutil

    shutil.copytree(trio["tuned"], tmp_path / "run" / "checkpoint-1")
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=tmp_path / "run", output=tmp_path / "out")
    meta = {r.output.name: json.loads((r.output / "shadowgraft.json").read_text()) for r in res.results}
    assert meta["checkpoint-1"]["nonfinite"] == {} and meta["checkpoint-2"]["nonfinite"] == {bad: 1}
    # --strict fails the bad checkpoint alone; the clean one is written.
    with pytest.raises(ShadowgraftError, match=r"1 of 2 tuned checkpoints failed \(the other outputs are complete\): .*checkpoint-2: "
                                               r"'model\.layers\.1\.mlp\.up_proj\.weight': 1 NaN/Inf"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=tmp_path / "run", output=tmp_path / "strict",
                          strict=True)
    assert (tmp_path / "strict" / "checkpoint-1" / "shadowgraft.json").is_file()
    assert not (tmp_path / "strict" / "checkpoint-2").exists()
    assert not [p for p in (tmp_path / "strict").iterdir() if p.name.startswith(".")]


def test_overflow_to_inf_is_counted_and_fails_strict(tmp_path, trio):
    """bf16 holds 1e6; float16 cannot (max 65504): the rounded value is Inf, in grafted and cast tensors alike."""
    inst = tmp_path / "inst"
    _poisoned_copy(trio["instruct"], inst, "model.layers.0.self_attn.q_proj.weight", 1e6)
    res = shadowgraft.apply(instruct=inst, base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o", dtype="float16")
    assert res.stats.nonfinite == {"model.layers.0.self_attn.q_proj.weight": 1}
    assert json.loads((tmp_path / "o" / "shadowgraft.json").read_text())["nonfinite"] == res.stats.nonfinite
    cast = tmp_path / "inst2"
    _poisoned_copy(trio["instruct"], cast, "model.embed_tokens.weight", -1e6)
    res = shadowgraft.apply(instruct=cast, base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o2", dtype="float16")
    assert res.stats.nonfinite == {"model.embed_tokens.weight": 1}
    assert load(tmp_path / "o2")["model.embed_tokens.weight"].view(-1)[0] == -math.inf
    with pytest.raises(ShadowgraftError, match=r"'model\.embed_tokens\.weight': 1 NaN/Inf value\(s\)"):
        shadowgraft.apply(instruct=cast, base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o3", dtype="float16",
                          strict=True)
    assert not (tmp_path / "o3").exists()


def test_quiet_still_prints_nonfinite_values(tmp_path, trio, capsys):
    from .conftest import run_cli

    inst = tmp_path / "inst"
    _poisoned_copy(trio["instruct"], inst, "model.layers.0.self_attn.q_proj.weight", 1e6)
    code, out, err = run_cli(capsys, "apply", "--instruct", inst, "--base", trio["base"], "--tuned", trio["tuned"],
                             "-o", tmp_path / "o", "--dtype", "float16", "-q")
    assert code == 0 and out == ""
    assert "NaN/Inf values in 1 grafted tensor(s): model.layers.0.self_attn.q_proj.weight (1)" in " ".join(err.split())


def test_push_target_is_checked_before_any_work_from_python(tmp_path, trio, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShadowgraftError, match="HF_HUB_OFFLINE=1 is set"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o",
                          push_to_hub="me/graft")
    assert not (tmp_path / "o").exists()


def test_push_with_several_outputs_is_refused_before_any_work(tmp_path, trio):
    with pytest.raises(ShadowgraftError, match=r"--push-to-hub takes one output; push each folder with `shadowgraft push`"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o",
                          alpha="0.5,1", push_to_hub="me/graft")
    assert not (tmp_path / "o").exists()


def test_a_bad_checkpoint_in_an_alpha_grid_counts_every_output_it_misses(tmp_path, trio):
    import shutil

    other = make_trio(tmp_path / "other", shape=Shape(layers=3, hidden=64, intermediate=128, vocab=128))
    shutil.copytree(trio["tuned"], tmp_path / "run" / "checkpoint-1")
    shutil.copytree(other["tuned"], tmp_path / "run" / "checkpoint-2")
    with pytest.raises(ShadowgraftError, match=r"^2 of 4 outputs failed \(the other outputs are complete\): .*checkpoint-2: "):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=tmp_path / "run", output=tmp_path / "out",
                          alpha="0.5,1")
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-1").iterdir()) == ["alpha-0.5", "alpha-1.0"]
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_a_grid_whose_every_output_is_refused_leaves_no_folder(tmp_path, trio):
    """--strict refuses both alphas (their grafts overflow bf16): the output root this run made goes again."""
    with pytest.raises(ShadowgraftError, match=r"^2 of 2 outputs failed: output alpha 1e\+300: .*NaN/Inf"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "grid",
                          alpha="1e300,1e301", strict=True)
    assert not (tmp_path / "grid").exists()
    # A root that existed before the run stays, empty or not.
    (tmp_path / "mine").mkdir()
    with pytest.raises(ShadowgraftError, match=r"^2 of 2 outputs failed: "):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "mine",
                          alpha="1e300,1e301", strict=True)
    assert (tmp_path / "mine").is_dir()
