"""`shadowgraft shadow-ft` end to end on tiny Llamas, checked against float64 references."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch

from shadowgraft import ShadowgraftError
from shadowgraft.cli import main
from shadowgraft.pipeline import shadow_ft

from .conftest import assert_exact, load, run_cli
from .tiny_lm import pair  # noqa: F401  (module fixture)
from .tiny_lm import CHATML

pytest.importorskip("transformers")
pytest.importorskip("peft")

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sigma_mean64(a: dict, b: dict) -> float:
    """The paper's relative gap, averaged over transformer-block tensors, in float64."""
    vals = []
    for n in a:
        if ".layers." in n:
            x, y = a[n].double(), b[n].double()
            vals.append(float((x - y).abs().sum() / (x.abs().sum() + y.abs().sum())))
    return sum(vals) / len(vals)


def test_shadow_ft_full_end_to_end(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    argv = ["shadow-ft", "--base", str(pair["base"]), "--instruct", str(pair["instruct"]), "--data", str(pair["data"]),
            "--output", str(out), "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "1", "--max-steps", "6",
            "--save-every", "3", "--no-gradient-checkpointing", "-q"]
    main(argv)
    model_dir, train_dir = out / "model", out / "stages" / "train"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == CHATML

    base, inst, tuned, got = (load(p) for p in (pair["base"], pair["instruct"], train_dir, model_dir))
    assert set(got) == set(inst) == set(tuned)
    grafted = [n for n in got if any(k in n for k in LINEAR)]
    assert len(grafted) == 14
    for n, y in got.items():
        assert y.dtype == inst[n].dtype == torch.bfloat16
        if n in grafted:
            assert not torch.equal(tuned[n], base[n])
            assert_exact(y, inst[n].double() + (tuned[n].double() - base[n].double()))
        else:
            assert torch.equal(y.view(torch.int16), inst[n].view(torch.int16)), n

    record = json.loads((model_dir / "shadowgraft.json").read_text())
    sha = hashlib.sha256(pair["data"].read_bytes()).hexdigest()
    tr = record["training"]
    assert tr["data_sha256"] == sha and tr["steps"] == 6 and tr["examples"] == 16
    hp = tr["hyperparameters"]
    assert (hp["lr"], hp["max_steps"], hp["method"], hp["chat_template_from"]) == (0.01, 6, "full", str(pair["instruct"]))
    stats = json.loads((out / "stages" / "stats.json").read_text())["summary"]
    assert stats["sigma_mean"] == pytest.approx(sigma_mean64(base, inst), rel=1e-6)
    assert record["similarity"]["sigma_mean"] == stats["sigma_mean"]
    card = (model_dir / "README.md").read_text()
    assert sha in card and "| lr | 0.01 |" in card

    # A later stage fails (here: the graft output is lost): re-running reuses the training.
    before = (train_dir / "model.safetensors").stat().st_mtime_ns
    grafted_bytes = (model_dir / "model.safetensors").read_bytes()
    os.remove(model_dir / "model.safetensors")
    kw = dict(base=str(pair["base"]), instruct=str(pair["instruct"]), data=str(pair["data"]), output=out, lr=1e-2,
              batch_size=4, grad_accum=1, max_steps=6, save_every=3, gradient_checkpointing=False, quiet=True)
    res = shadow_ft(**kw)
    assert res.trained is False and (train_dir / "model.safetensors").stat().st_mtime_ns == before
    assert (model_dir / "model.safetensors").read_bytes() == grafted_bytes

    # Training died after its step-3 checkpoint: re-running resumes it and ends where the first run did.
    for f in ("train_result.json", "model.safetensors"):
        os.remove(train_dir / f)
    res = shadow_ft(**kw)
    assert res.trained is True
    assert (model_dir / "model.safetensors").read_bytes() == grafted_bytes

    with pytest.raises(ShadowgraftError) as e:
        shadow_ft(**{**kw, "lr": 2e-2})
    assert str(e.value) == (f"{train_dir}: was trained with lr=0.01, not 0.02; "
                            "pass --overwrite to retrain, or choose another --output")


def test_shadow_ft_lora_grafts_the_peft_merge(pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    res = shadow_ft(base=pair["base"], instruct=pair["instruct"], data=pair["data"], output=out, lora_rank=4, lr=3e-2,
                    batch_size=4, grad_accum=1, max_steps=5, gradient_checkpointing=False, max_sigma=1e-4, quiet=True)
    assert res.trained and res.model == (out / "model").absolute()
    assert len(res.warnings) == 1 and "above 0.0001" in res.warnings[0]
    # Reference: PEFT's own merge of the adapter into base, in fp32; its change is what lands on instruct.
    b = AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32)
    base = {k: v.clone() for k, v in b.state_dict().items()}
    merged = PeftModel.from_pretrained(b, out / "stages" / "train").merge_and_unload().state_dict()
    inst, got = load(pair["instruct"]), load(out / "model")
    changed = [n for n in got if not torch.equal(merged[n], base[n])]
    assert len(changed) == 14 and all(any(k in n for k in LINEAR) for n in changed)
    for n, y in got.items():
        ref = inst[n].double() + (merged[n].double() - base[n].double())
        assert_exact(y, ref)
    record = json.loads((out / "model" / "shadowgraft.json").read_text())
    assert record["mode"] == "adapter"
    assert (record["training"]["hyperparameters"]["lora_rank"], record["training"]["hyperparameters"]["lora_alpha"]) == (4, 8.0)


def test_shadow_ft_checks_inputs_before_working(pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        shadow_ft(base=pair["base"], instruct=pair["instruct"], data=tmp_path / "none.jsonl", output=tmp_path / "o")
    with pytest.raises(ShadowgraftError, match="--batch-size must be at least 1, got 0"):
        shadow_ft(base=pair["base"], instruct=pair["instruct"], data=pair["data"], output=tmp_path / "o", batch_size=0)
    assert not (tmp_path / "o").exists()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ShadowgraftError) as e:
        shadow_ft(base=pair["base"], instruct=pair["instruct"], data=pair["data"], output=tmp_path / "m", overwrite=True)
    assert str(e.value) == (f"{tmp_path / 'm'}: exists and is not a shadow-ft run folder (no stages/), so it is left "
                            "alone; choose another --output")
    assert (tmp_path / "m" / "config.json").exists()


def test_output_never_replaces_an_input_even_with_overwrite(tmp_path):
    from shadowgraft.train import TrainConfig
    from shadowgraft.train.loop import _check_output

    runs = tmp_path / "runs"
    base, instruct = runs / "base", runs / "instruct"
    for d in (base, instruct):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": []}\n')
    for output, why in ((instruct, "is the input"), (runs, "holds the input"), (base / "ft", "lies inside the input folder")):
        with pytest.raises(ShadowgraftError, match=why):
            shadow_ft(base=base, instruct=instruct, data=data, output=output, overwrite=True)
        with pytest.raises(ShadowgraftError, match=why):
            _check_output(TrainConfig(model=str(base), data=str(data), output=str(output), overwrite=True,
                                      chat_template_from=str(instruct)))
    with pytest.raises(ShadowgraftError, match="is the input"):
        _check_output(TrainConfig(model=str(base), data=str(data), output=str(data), overwrite=True))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "data.jsonl", "runs", "runs/base", "runs/base/config.json", "runs/instruct", "runs/instruct/config.json"]


def test_shadow_ft_dpo_grafts_the_preference_tuned_change(pair, tmp_path):
    from .tiny_lm import pref_rows, write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", pref_rows(4))
    out = tmp_path / "run"
    main(["shadow-ft", "--objective", "dpo", "--beta", "0.2", "--base", str(pair["base"]), "--instruct",
          str(pair["instruct"]), "--data", str(data), "--output", str(out), "--lr", "1e-3", "--batch-size", "4",
          "--grad-accum", "1", "--max-steps", "4", "--no-gradient-checkpointing", "-q"])
    train_dir, model_dir = out / "stages" / "train", out / "model"
    rows = [json.loads(x) for x in (train_dir / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6) and rows[-1]["reward_accuracy"] == 1.0
    base, inst, tuned, got = (load(p) for p in (pair["base"], pair["instruct"], train_dir, model_dir))
    grafted = [n for n in got if any(k in n for k in LINEAR)]
    assert len(grafted) == 14
    for n, y in got.items():
        if n in grafted:
            assert not torch.equal(tuned[n], base[n])
            assert_exact(y, inst[n].double() + (tuned[n].double() - base[n].double()))
        else:
            assert torch.equal(y.view(torch.int16), inst[n].view(torch.int16)), n
    tr = json.loads((model_dir / "shadowgraft.json").read_text())["training"]
    assert tr["objective"] == "dpo" and tr["examples"] == 4
    assert (tr["hyperparameters"]["objective"], tr["hyperparameters"]["beta"]) == ("dpo", 0.2)
    card = (model_dir / "README.md").read_text()
    assert "| objective | dpo |" in card and "| beta | 0.2 |" in card


def test_overwrite_keeps_the_earlier_run_until_the_new_one_is_complete(pair, tmp_path):
    """A replacing run that fails (here: malformed data, found once training starts reading it) puts the earlier run back;
    a folder holding anything shadow-ft does not write is never reused or replaced."""
    out = tmp_path / "run"
    kw = dict(base=pair["base"], instruct=pair["instruct"], output=out, lr=1e-2, batch_size=4, grad_accum=1,
              max_steps=1, gradient_checkpointing=False)
    shadow_ft(data=pair["data"], **kw)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    with pytest.raises(ShadowgraftError, match="bad.jsonl:1"):
        shadow_ft(data=bad, overwrite=True, **kw)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Anything shadow-ft does not write, at any depth it writes to, is the user's: never reused or replaced.
    for mine in (out / "notes.md", out / "model" / "eval_results.json", out / "stages" / "train" / "notes.txt"):
        mine.write_text("mine")
        for overwrite in (False, True):
            with pytest.raises(ShadowgraftError, match=rf"holds {re.escape(str(mine.relative_to(out)))}, which shadow-ft "
                                                       "does not write"):
                shadow_ft(data=pair["data"], overwrite=overwrite, **kw)
        assert mine.read_text() == "mine"
        mine.unlink()


def test_a_pair_that_differs_in_shape_is_refused_before_training(pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(pair["instruct"], other)
    weights = load_file(other / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 48, dtype=torch.bfloat16)
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    with pytest.raises(ShadowgraftError) as e:
        shadow_ft(base=pair["base"], instruct=other, data=pair["data"], output=out, max_steps=1)
    assert str(e.value) == (f"'model.layers.0.mlp.down_proj.weight': base (32, 64) != instruct (32, 48) (1 tensor(s) differ "
                            f"in shape), so {pair['base']} is not the base of {other} and nothing trained on it could be "
                            "grafted; check --base and --instruct")
    assert not (out / "stages" / "train").exists()


def test_nan_in_the_graft_is_never_silent_and_strict_refuses_it(pair, tmp_path, capsys):
    args = ["shadow-ft", "--base", pair["base"], "--instruct", pair["instruct"], "--data", pair["data"], "--max-steps", "1",
            "--grad-accum", "1", "--batch-size", "4", "--alpha", "1e308", "-q", "--no-gradient-checkpointing"]
    code, out, err = run_cli(capsys, *args, "-o", tmp_path / "a")
    assert code == 0 and " ".join(err.split()).startswith("warning: NaN/Inf values in 14 grafted tensor(s): ")
    code, out, err = run_cli(capsys, *args, "-o", tmp_path / "b", "--strict")
    assert code == 1 and "NaN/Inf value(s) after grafting (14 tensor(s) affected)" in " ".join(err.split())
    assert not (tmp_path / "b" / "model").exists()
