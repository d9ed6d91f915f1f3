"""DPO on a tiny Llama: the loss against float64 references, ln 2 at step 0, learning, PEFT and graft, torchrun, resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from shadowgraft import ShadowgraftError
from shadowgraft.train import TrainConfig, train

from .conftest import assert_exact, load, run_cli
from .tiny_lm import pair  # noqa: F401  (module fixture)
from .tiny_lm import assert_same_weights, torchrun_train, pref_rows, write_jsonl

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIELDS = {"step", "epoch", "loss", "lr", "tokens_per_s", "rewards_chosen", "rewards_rejected", "reward_margin",
          "reward_accuracy"}


@pytest.fixture(scope="module")
def prefs(pair, tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", pref_rows(4))


def cfg(pair, data, out, **kw) -> TrainConfig:
    base = dict(model=str(pair["base"]), data=str(data), output=str(out), chat_template_from=str(pair["instruct"]),
                objective="dpo", batch_size=4, grad_accum=1, gradient_checkpointing=False, quiet=True)
    return TrainConfig(**{**base, **kw})


def log(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def logps64(model, tok, rows) -> list[tuple[float, float]]:
    """log p(chosen | prompt), log p(rejected | prompt) of each row, in float64 from the model's logits.

    Built without the code under test: the prompt is rendered as a user turn
    with the generation prompt, the reply (and ChatML's end-of-turn marker)
    follows, each tokenized on its own.
    """
    out = []
    with torch.no_grad():
        for r in rows:
            prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            sides = []
            for reply in (r["chosen"], r["rejected"]):
                y = tok(reply + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
                logits = model(input_ids=torch.tensor([p + y])).logits[0].double()
                lp = torch.log_softmax(logits, -1)
                sides.append(sum(float(lp[len(p) + k - 1, t]) for k, t in enumerate(y)))
            out.append(tuple(sides))
    return out


def dpo64(policy, ref, beta) -> list[tuple[float, float, float]]:
    """Per pair: the DPO loss and the chosen / rejected rewards, in float64."""
    out = []
    for (pc, pr), (rc, rr) in zip(policy, ref):
        c, r = beta * (pc - rc), beta * (pr - rr)
        out.append((math.log1p(math.exp(-(c - r))), c, r))
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full-precomputed", "lora-adapters-off"])
def test_one_batch_loss_equals_a_float64_computation_from_logits(pair, prefs, tmp_path, lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shadowgraft.train.dist import Dist
    from shadowgraft.train.dpo import DPO
    from shadowgraft.train.prefs import encode_pairs, read_pairs

    tok = AutoTokenizer.from_pretrained(pair["instruct"])
    rows = pref_rows(4)
    pairs, _ = encode_pairs(read_pairs(prefs), tokenizer=tok, chat_template=tok.chat_template, max_length=512)
    reference = AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32)
    beta = 0.5
    obj = DPO(pairs, dropped=0, pad_id=0, d=Dist(), beta=beta, lora=lora)
    if lora:
        # Random A and B, so the policy differs from the model with its adapters off.
        torch.manual_seed(3)
        policy = get_peft_model(AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    else:
        # Batches of 3 pairs: the second pass holds one real pair.
        obj.prepare(reference, out=tmp_path, resumed=False, batch_size=3)
        policy = AutoModelForCausalLM.from_pretrained(pair["instruct"], dtype=torch.float32)  # base + 2% noise
    ref = logps64(reference, tok, rows)
    want = dpo64(logps64(policy, tok, rows), ref, beta)
    if not lora:
        assert obj.reference.flatten().tolist() == pytest.approx([v for x in ref for v in x], rel=1e-6)
        assert json.loads((tmp_path / "reference_logps.json").read_text())["logps"] == obj.reference.tolist()
    idx = [2, 0, 3]
    summed, sums = obj.loss(policy, idx)
    w = [want[i] for i in idx]
    assert float(summed.detach()) == pytest.approx(sum(x[0] for x in w), rel=1e-6)
    assert all(abs(x[1] - x[2]) > 1e-3 for x in w)  # policy != reference: a real test of the loss
    expect = [sum(x[0] for x in w), sum(x[1] for x in w), sum(x[2] for x in w), sum(x[1] - x[2] for x in w),
              sum(x[1] > x[2] for x in w)]
    # Rewards are beta x differences of log-probs near -100 that the model computes in float32
    # (eps 6e-8): an absolute tolerance of that size, not a relative one.
    assert sums.tolist() == pytest.approx(expect, rel=1e-6, abs=1e-5)
    summed.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def runs(pair, prefs, tmp_path_factory):
    """A full and a LoRA DPO run on the four pairs."""
    root = tmp_path_factory.mktemp("dpo-runs")
    train(config=cfg(pair, prefs, root / "full", lr=1e-3, max_steps=8))
    train(config=cfg(pair, prefs, root / "lora", lora_rank=8, lr=1e-2, max_steps=6))
    return {"full": root / "full", "lora": root / "lora"}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_step_zero_is_ln2_and_dpo_learns_the_preferences(pair, runs, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs[method]
    rows = log(out)
    assert set(rows[0]) == FIELDS
    # The policy starts as the reference: every pair's loss is ln 2, its rewards 0.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [rows[0][k] for k in ("rewards_chosen", "rewards_rejected", "reward_margin")] == pytest.approx([0, 0, 0], abs=1e-6)
    assert rows[-1]["reward_accuracy"] == 1.0 and rows[-1]["reward_margin"] > 0.5 and rows[-1]["loss"] < 0.4
    args = json.loads((out / "training_args.json").read_text())
    assert (args["hyperparameters"]["objective"], args["hyperparameters"]["beta"], args["examples"]) == ("dpo", 0.1, 4)

    # Independently, from the saved weights: log pi(chosen) - log pi(rejected) rose on every pair.
    tok = AutoTokenizer.from_pretrained(pair["instruct"])
    base = AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32)
    before = [c - r for c, r in logps64(base, tok, pref_rows(4))]
    tuned = (PeftModel.from_pretrained(base, out) if method == "lora"
             else AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    after = [c - r for c, r in logps64(tuned, tok, pref_rows(4))]
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)


def test_dpo_lora_adapter_grafts_with_apply(pair, runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, _, err = run_cli(capsys, "apply", "--instruct", pair["instruct"], "--adapter", runs["lora"], "--output",
                           tmp_path / "g")
    assert code == 0, err
    # Reference: PEFT's own merge into base, in fp32; its change is what lands on instruct.
    b = AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32)
    base = {k: v.clone() for k, v in b.state_dict().items()}
    merged = PeftModel.from_pretrained(b, runs["lora"]).merge_and_unload().state_dict()
    inst, got = load(pair["instruct"]), load(tmp_path / "g")
    assert sum(not torch.equal(merged[n], base[n]) for n in got) == 14
    for n, y in got.items():
        assert_exact(y, inst[n].double() + (merged[n].double() - base[n].double()))


@pytest.mark.parametrize("lora", [None, 4], ids=["full-fsdp2", "lora-ddp"])
def test_torchrun_two_ranks_match_one_process(pair, tmp_path, lora):
    # Five pairs: the reference pass of two ranks x 2 pairs ends with one real pair and three fillers.
    data = write_jsonl(tmp_path / "prefs5.jsonl", pref_rows(5))
    one, two = tmp_path / "one", tmp_path / "two"
    lr = 1e-2 if lora else 1e-3
    train(config=cfg(pair, data, one, batch_size=2, grad_accum=2, lr=lr, max_steps=4, lora_rank=lora))
    args = ["--objective", "dpo", "--model", str(pair["base"]), "--data", str(data), "--output", str(two),
            "--chat-template-from", str(pair["instruct"]), "--batch-size", "2", "--grad-accum", "1", "--lr", str(lr),
            "--max-steps", "4", "--no-gradient-checkpointing", "--device", "cpu", "-q"]
    args += ["--lora-rank", str(lora)] if lora else []
    torchrun_train(args)
    a, b = log(one), log(two)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for k in ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "lr"):
        assert [x[k] for x in b] == pytest.approx([x[k] for x in a], rel=1e-5, abs=1e-7), k
    assert b[-1]["loss"] < 0.9 * math.log(2)
    if not lora:
        ra, rb = (json.loads((p / "reference_logps.json").read_text())["logps"] for p in (one, two))
        assert len(ra) == 5 and sum(rb, []) == pytest.approx(sum(ra, []), rel=1e-6)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_same_weights(one, two, name)


def test_full_dpo_resume_continues_exactly_and_needs_its_reference(pair, prefs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(lr=1e-3, max_steps=4, save_every=2, batch_size=2)
    train(config=cfg(pair, prefs, a, **kw))
    shutil.copytree(a, b)
    for f in ("train_result.json", "model.safetensors"):
        (b / f).unlink()
    # The resumed weights are no longer the reference: the log-probs are read back, not recomputed.
    ref = b / "reference_logps.json"
    saved = ref.read_text()
    ref.unlink()
    with pytest.raises(ShadowgraftError, match="reference_logps.json: the reference log-probabilities of this run are "
                                               "unreadable"):
        train(config=cfg(pair, prefs, b, resume=True, **kw))
    ref.write_text(saved)
    assert train(config=cfg(pair, prefs, b, resume=True, **kw)).start_step == 2
    assert log(b) == [{**r, "tokens_per_s": s["tokens_per_s"]} for r, s in zip(log(a), log(b))] and len(log(b)) == 4
    wa, wb = load(a / "model.safetensors"), load(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A full DPO run folder (with its reference_logps.json) is one --overwrite may replace.
    train(config=cfg(pair, prefs, a, **{**kw, "max_steps": 1, "overwrite": True}))
    assert json.loads((a / "train_result.json").read_text())["steps"] == 1


def test_dpo_refusals(pair, prefs, tmp_path):
    with pytest.raises(ShadowgraftError, match=r"^--beta must be a positive number, got 0.0$"):
        train(config=cfg(pair, prefs, tmp_path / "o", beta=0.0))
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, prefs, tmp_path / "o", packing=True))
    assert str(e.value) == "--packing is for --objective sft; DPO scores each chosen and rejected reply whole"
    with pytest.raises(ShadowgraftError, match=r"^unknown --objective 'ppo'; use sft or dpo$"):
        train(config=cfg(pair, prefs, tmp_path / "o", objective="ppo"))
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, pair["data"], tmp_path / "o"))  # chat records, not pairs
    assert str(e.value) == (f"{pair['data']}:1: not a preference pair (keys: messages); --objective dpo needs "
                            "'prompt', 'chosen' and 'rejected'")
    assert not (tmp_path / "o").exists()
    # SFT records neither objective nor beta among its hyper-parameters (runs made before DPO compare equal).
    assert {"objective", "beta"}.isdisjoint(TrainConfig(model="m", data="d", output="o").hyperparameters())


def test_a_dpo_loss_that_overflows_names_beta_too(pair, prefs, tmp_path):
    with pytest.raises(ShadowgraftError, match=r"(loss became nan at step 1;|weights became NaN/Inf by step 1 .*nothing was saved:) "
                                               r"lower --lr \(now 1e-05\) or --beta \(now 1e\+308\)$"):
        train(config=cfg(pair, prefs, tmp_path / "o", beta=1e308, max_steps=1, lr=1e-5))
    assert not (tmp_path / "o").exists()
