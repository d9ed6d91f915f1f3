"""The training loop on a tiny Llama: learning, outputs, resume, torchrun, and the optional extra."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shadowgraft import ShadowgraftError
from shadowgraft.train import TrainConfig, train
from shadowgraft.train.loop import cosine_lr, step_examples
from shadowgraft.train.model import require_extra

from .conftest import load
from .conftest import run_cli
from .tiny_lm import pair  # noqa: F401  (module fixture)
from .tiny_lm import CHATML, assert_same_weights, torchrun_train, qa_rows, tiny_pair, write_jsonl

pytest.importorskip("transformers")
pytest.importorskip("peft")

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg(pair, out, **kw) -> TrainConfig:
    base = dict(model=str(pair["base"]), data=str(pair["data"]), output=str(out), chat_template_from=str(pair["instruct"]),
                batch_size=4, grad_accum=1, quiet=True)
    return TrainConfig(**{**base, **kw})


def log(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def data_loss(model, pair) -> float:
    """Mean loss over the assistant tokens of the data set, computed independently of the loop."""
    from transformers import AutoTokenizer

    from shadowgraft.train.data import encode, read_records

    tok = AutoTokenizer.from_pretrained(pair["instruct"])
    exs, _ = encode(read_records(pair["data"])[:4], tokenizer=tok, chat_template=tok.chat_template, max_length=512)
    total = n = 0.0
    with torch.no_grad():
        for e in exs:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits.float()[0, :-1]
            labels = torch.tensor(e.labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
    return total / n


def test_full_fine_tuning_learns_and_writes_a_checkpoint_transformers_loads(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    res = train(config=cfg(pair, out, lr=1e-2, max_steps=30))
    rows = log(out)
    assert [r["step"] for r in rows] == list(range(1, 31)) and res.steps == 30
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "tokens_per_s"}
    assert rows[0]["loss"] > 5.0 and rows[-1]["loss"] < 0.3 * rows[0]["loss"]
    assert rows[3]["epoch"] == 1.0  # 16 examples, 4 per step
    # Shards, config and tokenizer, in the base's names and dtypes.
    base, tuned = load(pair["base"]), load(out)
    assert set(tuned) == set(base) and all(tuned[k].dtype == base[k].dtype == torch.bfloat16 for k in base)
    assert not torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert data_loss(model, pair) < 0.3 * data_loss(AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32), pair)
    args = json.loads((out / "training_args.json").read_text())
    assert args["hyperparameters"]["lr"] == 1e-2 and args["hyperparameters"]["method"] == "full" and args["examples"] == 16
    assert json.loads((out / "train_result.json").read_text())["steps"] == 30


def test_lora_learns_and_writes_a_peft_adapter(pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train(config=cfg(pair, out, lora_rank=8, lr=3e-2, max_steps=30))
    rows = log(out)
    assert rows[-1]["loss"] < 0.4 * rows[0]["loss"]
    ac = json.loads((out / "adapter_config.json").read_text())
    assert ac["r"] == 8 and ac["lora_alpha"] == 16
    # Every linear layer of both blocks, and not lm_head.
    assert len(ac["target_modules"]) == 14 and {m.rsplit(".", 1)[-1] for m in ac["target_modules"]} == LINEAR
    base = AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32)
    before = data_loss(base, pair)
    assert data_loss(PeftModel.from_pretrained(base, out), pair) < 0.5 * before


def test_learning_rate_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=50).lr_lambdas[0]
    assert [cosine_lr(s, total=50, warmup=5) for s in range(51)] == pytest.approx([ref(s) for s in range(51)], abs=1e-12)


def test_step_examples_cover_each_epoch_and_reshuffle():
    n, per_step = 10, 4
    spe = 3  # ceil(10 / 4)
    for epoch in range(2):
        seen = [i for s in range(epoch * spe, (epoch + 1) * spe) for i in step_examples(n, step=s, per_step=per_step,
                                                                                          steps_per_epoch=spe, seed=1)]
        assert set(seen) == set(range(n)) and len(seen) == 12
    first = step_examples(n, step=0, per_step=per_step, steps_per_epoch=spe, seed=1)
    assert first == step_examples(n, step=0, per_step=per_step, steps_per_epoch=spe, seed=1)  # deterministic
    assert first != step_examples(n, step=spe, per_step=per_step, steps_per_epoch=spe, seed=1)  # reshuffled per epoch
    assert first != step_examples(n, step=0, per_step=per_step, steps_per_epoch=spe, seed=2)  # seeded


def test_tied_embeddings_are_saved_once(tmp_path):
    from transformers import AutoModelForCausalLM

    p = tiny_pair(tmp_path / "tied", tie=True)
    p["data"] = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    out = tmp_path / "out"
    train(config=cfg(p, out, lr=1e-2, max_steps=2, gradient_checkpointing=False))
    tuned, base = load(out), load(p["base"])
    assert "lm_head.weight" not in tuned and set(tuned) == set(base)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.model.embed_tokens.weight.bfloat16(), tuned["model.embed_tokens.weight"])


@pytest.mark.parametrize("lora", [None, 4])
def test_resume_continues_exactly_like_an_uninterrupted_run(pair, tmp_path, lora):
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(lr=1e-2, max_steps=6, save_every=3, lora_rank=lora, gradient_checkpointing=False)
    train(config=cfg(pair, a, **kw))
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step-00000003"]
    state = json.loads((a / "checkpoints/step-00000003/state.json").read_text())
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    # b is a copy of a that died between step 3 and the end.
    shutil.copytree(a, b)
    for f in ("train_result.json", "model.safetensors", "adapter_model.safetensors"):
        (b / f).unlink(missing_ok=True)
    res = train(config=cfg(pair, b, resume=True, **kw))
    assert res.start_step == 3
    assert log(b) == [{**r, "tokens_per_s": s["tokens_per_s"]} for r, s in zip(log(a), log(b))]
    assert len(log(b)) == 6
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    wa, wb = load(a / name), load(b / name)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_output_and_resume_refusals(pair, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, out, max_steps=1))
    assert str(e.value) == f"{out}: already exists; pass --resume to continue it or --overwrite to start over"
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, out, max_steps=1, resume=True))
    assert str(e.value) == (f"{out}: no checkpoint to resume from under {out / 'checkpoints'}; "
                            "run without --resume (and with --save-every N to make some)")
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, out, max_steps=1, overwrite=True))
    want = (f"{out}: is not a training run folder (no training_args.json written by shadowgraft train), so --overwrite "
            "will not delete it; choose another --output")
    assert str(e.value) == want
    (out / "training_args.json").write_text("{}")  # a file of that name is no mark
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, out, max_steps=1, overwrite=True))
    assert str(e.value) == want
    (out / "x").unlink()
    (out / "training_args.json").unlink()
    train(config=cfg(pair, out, max_steps=1, gradient_checkpointing=False))  # an empty folder is fine
    (out / "x").write_text("")  # the user's, added to a finished run: not ours to delete
    with pytest.raises(ShadowgraftError, match=r"an earlier training run, but it also holds x, which shadowgraft did not "
                                               r"write; --overwrite will not delete them"):
        train(config=cfg(pair, out, max_steps=2, save_every=1, overwrite=True, gradient_checkpointing=False))
    (out / "x").unlink()
    train(config=cfg(pair, out, max_steps=2, save_every=1, overwrite=True, gradient_checkpointing=False))
    for mine in (out / "checkpoints" / "notes.txt", out / "checkpoints" / "step-00000001" / "eval.json"):
        mine.write_text("")
        with pytest.raises(ShadowgraftError, match="an earlier training run, but it also holds checkpoints, which"):
            train(config=cfg(pair, out, max_steps=2, save_every=1, overwrite=True, gradient_checkpointing=False))
        mine.unlink()
    with pytest.raises(ShadowgraftError, match="this run already finished; nothing to resume"):
        train(config=cfg(pair, out, max_steps=2, save_every=1, resume=True, gradient_checkpointing=False))
    (out / "train_result.json").unlink()
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, out, max_steps=2, save_every=1, resume=True, gradient_checkpointing=False, lr=0.5))
    assert str(e.value) == (f"{out / 'checkpoints/step-00000001'}: was trained with lr=1e-05, not 0.5; "
                            "resume with the same flags or start over with --overwrite")
    # Another model, or another template behind the same --chat-template-from, is another run.
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, out, max_steps=2, save_every=1, resume=True, gradient_checkpointing=False,
                         model=str(pair["instruct"])))
    assert str(e.value) == (f"{out / 'checkpoints/step-00000001'}: was trained from {pair['base']}, not {pair['instruct']}; "
                            "resume with the same --model or start over with --overwrite")
    template = tmp_path / "t.jinja"
    template.write_text("{# edited #}" + CHATML)
    with pytest.raises(ShadowgraftError, match="was trained with another chat template than .*t.jinja gives now"):
        train(config=cfg(pair, out, max_steps=2, save_every=1, resume=True, gradient_checkpointing=False,
                         chat_template_from=str(template)))
    with pytest.raises(ShadowgraftError, match="--grad-accum must be at least 1, got 0"):
        train(config=cfg(pair, out, grad_accum=0))


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    require_extra(lora=True)  # installed here
    monkeypatch.setitem(sys.modules, "peft", None)
    require_extra(lora=False)  # full fine-tuning does not need peft
    with pytest.raises(ShadowgraftError) as e:
        require_extra(lora=True)
    assert str(e.value) == "training needs the train extra (missing: peft); run: pip install shadowgraft[train]"
    monkeypatch.setitem(sys.modules, "transformers", None)
    from shadowgraft.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--lora-rank", "8"])
    assert ex.value.code == 1
    err = capsys.readouterr().err
    assert "error: training needs the train extra (missing: transformers, peft); run: pip install shadowgraft[train]" in err
    assert "Traceback" not in err


def test_core_imports_without_the_train_extra():
    code = ("import sys\nfor m in ('transformers', 'peft', 'tokenizers'): sys.modules[m] = None\n"
            "import shadowgraft, shadowgraft.cli, shadowgraft.train, shadowgraft.pipeline, shadowgraft.save\n"
            "print(sorted(shadowgraft.cli.cli.commands))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'shadow-ft'" in r.stdout and "'train'" in r.stdout


@pytest.mark.parametrize("lora", [None, 4], ids=["full-fsdp2", "lora-ddp"])
def test_torchrun_two_ranks_match_one_process(pair, tmp_path, lora):
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(lr=1e-2, max_steps=4, lora_rank=lora, gradient_checkpointing=False)
    # One process: 2 sequences x 2 accumulated micro-batches; two ranks: 2 sequences each.
    train(config=cfg(pair, one, batch_size=2, grad_accum=2, **kw))
    args = ["--model", str(pair["base"]), "--data", str(pair["data"]), "--output", str(two), "--chat-template-from",
            str(pair["instruct"]), "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2", "--max-steps", "4",
            "--no-gradient-checkpointing", "--device", "cpu", "-q"] + (["--lora-rank", str(lora)] if lora else [])
    torchrun_train(args)
    a, b = log(one), log(two)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-5)
    assert [x["lr"] for x in b] == [x["lr"] for x in a]
    assert b[-1]["loss"] < b[0]["loss"]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    assert_same_weights(one, two, name)


def test_packed_examples_do_not_see_each_other(tmp_path):
    """Logits of each example inside a packed row equal its logits alone, as the loop calls the model."""
    from transformers import AutoModelForCausalLM

    from shadowgraft.train.data import IGNORE, Example, collate, pack

    from .tiny_lm import tiny_llama

    path = tiny_llama(tmp_path / "m", vocab=64, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    exs = [Example(tuple(torch.randint(3, 64, (n,), generator=g).tolist()), (IGNORE,) * n) for n in (7, 5, 9)]
    (row,) = pack(exs, max_length=64)
    batch = collate([row, exs[0]], pad_id=0)  # a padded second row, as a micro-batch has
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits[0]
        unmasked = model(input_ids=batch["input_ids"][:1], use_cache=False).logits[0]
        at = 0
        for k, e in enumerate(exs):
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            n = len(e.input_ids)
            assert torch.allclose(packed[at : at + n], alone, atol=1e-5), f"example {k} saw its neighbours"
            if k:
                # Without the positions the later examples do attend across: the check above can fail.
                assert not torch.allclose(unmasked[at : at + n], alone, atol=1e-3)
            at += n


def test_packing_trains(pair, tmp_path):
    out = tmp_path / "packed"
    train(config=cfg(pair, out, lr=1e-2, max_steps=20, packing=True, max_length=64, batch_size=2))
    rows = log(out)
    assert rows[-1]["loss"] < 0.4 * rows[0]["loss"]


def test_packing_probe_tells_isolating_models_from_alibi_ones(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

    from shadowgraft.train.model import packing_isolated

    from .tiny_lm import tiny_llama

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "m", vocab=64), dtype=torch.float32)
    tokens = list(range(5, 21))
    llama.train()
    assert packing_isolated(llama, tokens) and llama.training  # the model's mode is restored
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))  # ALiBi: no positions
    assert not packing_isolated(bloom, tokens)


def test_a_refused_run_leaves_the_previous_one(pair, tmp_path, monkeypatch):
    """--overwrite empties the output only once data and model are loaded and accepted."""
    from shadowgraft.train import loop

    out = tmp_path / "run"
    train(config=cfg(pair, out, lr=1e-2, max_steps=2))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(loop, "packing_isolated", lambda model, tokens: False)
    with pytest.raises(ShadowgraftError, match="--packing would let packed examples attend to each other"):
        train(config=cfg(pair, out, lr=1e-2, max_steps=2, packing=True, overwrite=True))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_run_that_fails_late_gives_back_the_run_it_was_replacing(pair, tmp_path):
    """--overwrite moves the earlier run aside until the new one is complete; NaN weights refuse the save."""
    out = tmp_path / "run"
    train(config=cfg(pair, out, max_steps=1, gradient_checkpointing=False))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ShadowgraftError, match=r"(loss|weights) became (nan|inf|NaN)"):
        train(config=cfg(pair, out, max_steps=3, lr=1e9, overwrite=True, gradient_checkpointing=False))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_weights_that_became_nan_are_never_saved(pair, tmp_path, monkeypatch):
    from shadowgraft.train import loop

    real = loop._check_finite

    def poisoned(model, d, step, c):
        next(p for p in model.parameters() if p.requires_grad).data.view(-1)[0] = float("nan")
        real(model, d, step, c)

    monkeypatch.setattr(loop, "_check_finite", poisoned)
    with pytest.raises(ShadowgraftError, match=r"^weights became NaN/Inf by step 1 \('.+' and 0 more\); nothing was saved: "
                                               r"lower --lr \(now 1e-05\)$"):
        train(config=cfg(pair, tmp_path / "run", max_steps=1, gradient_checkpointing=False))
    assert not (tmp_path / "run").exists()  # a new run that failed before any checkpoint leaves nothing


@pytest.mark.parametrize("flags,message", [(["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                                           (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
                                           (["--max-grad-norm", "nan"], "--max-grad-norm must be a number >= 0, got nan"),
                                           (["--max-shard-size", "banana"], "size 'banana' not understood"),
                                           (["--resume", "--overwrite"], "--resume and --overwrite contradict each other")])
def test_impossible_flag_values_are_usage_errors_before_anything_loads(pair, tmp_path, capsys, flags, message):
    code, out, err = run_cli(capsys, "train", "--model", pair["base"], "--data", pair["data"], "-o", tmp_path / "o", *flags)
    assert code == 2 and out == ""
    assert message in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_a_mistyped_local_model_or_template_is_named_not_looked_up_on_the_hub(pair, tmp_path, capsys):
    typo = str(pair["base"]) + "x"
    for flags, spec in ((["--model", typo], typo), (["--model", pair["base"], "--chat-template-from", tmp_path / "t.jinja"],
                                                     str(tmp_path / "t.jinja"))):
        code, _, err = run_cli(capsys, "train", *flags, "--data", pair["data"], "-o", tmp_path / "o", "--max-steps", "1")
        assert code == 1
        assert err.strip() == f"error: {spec}: no such file or folder (and not a Hub repo id)"


def test_skipped_records_are_reported_even_with_quiet(pair, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}]}
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows() + [long])
    code, out, err = run_cli(capsys, "train", "--model", pair["base"], "--chat-template-from", pair["instruct"], "--data", data,
                             "-o", tmp_path / "o", "--max-steps", "1", "--max-length", "64", "--batch-size", "2", "-q",
                             "--no-gradient-checkpointing")
    assert code == 0 and out == ""
    assert " ".join(err.split()) == "warning: 1 record(s) have no assistant token within --max-length 64 and are skipped"


def test_overwrite_through_a_link_replaces_the_folder_it_names(pair, tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    train(config=cfg(pair, real, max_steps=1, gradient_checkpointing=False))
    link.symlink_to(real)
    train(config=cfg(pair, link, max_steps=1, overwrite=True, gradient_checkpointing=False, lr=2e-5))
    assert link.is_symlink() and json.loads((real / "training_args.json").read_text())["hyperparameters"]["lr"] == 2e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_run_moved_aside_by_a_killed_run_is_named_not_lost(pair, tmp_path):
    out = tmp_path / "run"
    train(config=cfg(pair, out, max_steps=1, gradient_checkpointing=False))
    aside = tmp_path / ".run.shadowgraft-previous-999999999"  # no such process: its run was killed
    aside.mkdir()
    with pytest.raises(ShadowgraftError) as e:
        train(config=cfg(pair, out, max_steps=1, overwrite=True, gradient_checkpointing=False))
    assert str(e.value) == (f"{aside}: an earlier run of run, moved aside by a run that was killed before it finished; "
                            f"move it back to {out} or delete it, then run again")
    assert aside.is_dir() and (out / "train_result.json").is_file()
