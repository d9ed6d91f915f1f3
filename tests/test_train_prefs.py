"""Preference data for DPO: both shapes, exact errors, response-only labels, a shared prompt, truncation."""

from __future__ import annotations

import pytest

from shadowgraft import ShadowgraftError
from shadowgraft.train.data import IGNORE, read_records
from shadowgraft.train.prefs import collate_pairs, encode_pairs, read_pairs

from .tiny_lm import CHATML, assert_line_error, chatml_tokenizer, write_jsonl  # noqa: F401 (chatml_tokenizer is the tok fixture)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def labelled(tok, ex) -> str:
    """The text of the tokens that carry a label (checked to be the token itself)."""
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.input_ids, ex.labels))
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_both_shapes_parse_to_the_same_pair(tmp_path):
    s = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "what is two plus two?", "chosen": "four.", "rejected": "five."}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "what is two plus two?"}],
                                            "chosen": [{"role": "assistant", "content": "four."}],
                                            "rejected": [{"role": "assistant", "content": "five."}]}])
    (a,), (b,) = read_pairs(s), read_pairs(c)
    assert (a.kind, b.kind) == ("strings", "conversational")
    assert a.prompt == b.prompt == ({"role": "user", "content": "what is two plus two?"},)
    assert a.chosen == b.chosen == ({"role": "assistant", "content": "four."},)
    assert a.rejected == b.rejected == ({"role": "assistant", "content": "five."},)


def test_only_response_tokens_are_scored_and_the_prompt_is_shared(tmp_path, tok):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what is two plus two?"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "four."}],
                                               "rejected": [{"role": "assistant", "content": "five, or six"}]}])
    (pair,), dropped = encode_pairs(read_pairs(path), tokenizer=tok, chat_template=CHATML, max_length=4096)
    assert dropped == 0
    # The earlier assistant turn of the prompt is context, not scored.
    assert labelled(tok, pair.chosen) == "four.<|im_end|>\n"
    assert labelled(tok, pair.rejected) == "five, or six<|im_end|>\n"
    rendered = tok.apply_chat_template(prompt, chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])
    for ex, reply in ((pair.chosen, "four."), (pair.rejected, "five, or six")):
        assert tok.decode(list(ex.input_ids)) == rendered + reply + "<|im_end|>\n"
        assert set(ex.labels[:n]) == {IGNORE} and IGNORE not in ex.labels[n:]
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n]
    b = collate_pairs([pair], pad_id=0)
    assert b["input_ids"].shape[0] == 2 and b["labels"][0].tolist()[: len(pair.chosen.labels)] == list(pair.chosen.labels)


def test_a_string_prompt_is_one_user_turn(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "add 3 and 4", "chosen": "7", "rejected": "8"}])
    (pair,), _ = encode_pairs(read_pairs(path), tokenizer=tok, chat_template=CHATML, max_length=4096)
    assert tok.decode(list(pair.chosen.input_ids)) == "<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    assert labelled(tok, pair.rejected) == "8<|im_end|>\n"


def test_truncation_keeps_the_prompt_start_and_drops_pairs_with_no_response_left(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "hi", "chosen": "the quick brown fox " * 5, "rejected": "no"},
        {"prompt": "the quick brown fox " * 10, "chosen": "yes", "rejected": "no"},
    ])
    full, _ = encode_pairs(read_pairs(path), tokenizer=tok, chat_template=CHATML, max_length=10_000)
    first = [next(k for k, lab in enumerate(e.labels) if lab != IGNORE) for e in (full[0].chosen, full[1].chosen)]
    cut = len(full[0].rejected.input_ids) + 1  # the short rejected reply fits, the long chosen one does not
    assert len(full[0].chosen.input_ids) > cut and first[1] > cut  # nor does the second pair's prompt
    (pair,), dropped = encode_pairs(read_pairs(path), tokenizer=tok, chat_template=CHATML, max_length=cut)
    assert dropped == 1
    assert pair.chosen.input_ids == full[0].chosen.input_ids[:cut] and pair.chosen.n_targets == cut - first[0]
    assert pair.rejected == full[0].rejected
    assert pair.chosen.input_ids[: first[0]] == pair.rejected.input_ids[: first[0]]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "chosen": "y"', "not valid JSON (Expecting ',' delimiter at column 30); fix or remove the line"),
    ('{"messages": []}', "not a preference pair (keys: messages); --objective dpo needs 'prompt', 'chosen' and 'rejected'"),
    ('{"prompt": "x", "chosen": "", "rejected": "z"}', "'chosen' is empty; give both responses some text, or drop the line"),
    ('{"prompt": "x", "chosen": "y", "rejected": "  "}', "'rejected' is empty; give both responses some text, or drop the line"),
    ('{"prompt": "x", "chosen": "y", "rejected": "y"}', "'chosen' and 'rejected' are the same, so the pair prefers nothing; "
                                                        "fix or drop the line"),
    ('{"prompt": "x", "chosen": ["y"], "rejected": "z"}', "'prompt', 'chosen' and 'rejected' must be all strings or all "
                                                          "message lists"),
    ('{"prompt": [], "chosen": [], "rejected": []}', "'prompt' must be a non-empty list of {'role', 'content'} objects"),
    ('{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "y"}], "rejected": '
     '[{"role": "assistant", "content": "z"}]}', "'chosen' message 0 has role 'user'; a response holds assistant "
                                                "messages only (earlier turns belong in 'prompt')"),
    ('{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant"}], "rejected": '
     '[{"role": "assistant", "content": "z"}]}', "'chosen' message 0 needs 'role' and 'content'"),
])
def test_malformed_pair_names_file_and_line(tmp_path, line, message):
    text = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n' + line + "\n"
    assert_line_error(read_pairs, tmp_path / "p.jsonl", text, message)


def test_one_shape_per_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
         "rejected": [{"role": "assistant", "content": "c"}]},
    ])
    with pytest.raises(ShadowgraftError) as e:
        read_pairs(path)
    assert str(e.value) == (f"{path}:2: a conversational pair in a file of strings pairs (line 1); write every pair "
                            "of a file in one shape")


def test_pairs_need_a_template_and_sft_points_pairs_to_dpo(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(ShadowgraftError) as e:
        encode_pairs(read_pairs(path), tokenizer=tok, chat_template=None, max_length=64, path="p.jsonl")
    assert str(e.value) == ("p.jsonl:1: preference pairs need a chat template, and the model's tokenizer has none; "
                            "pass --chat-template-from INSTRUCT_MODEL")
    with pytest.raises(ShadowgraftError) as e:
        read_records(path)
    assert str(e.value) == f"{path}:1: a preference pair (keys: chosen, prompt, rejected); train on pairs with --objective dpo"
