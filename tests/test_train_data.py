"""Training data: the four JSONL shapes, exact errors, assistant-only labels, truncation and packing."""

from __future__ import annotations

import json

import pytest

from shadowgraft import ShadowgraftError
from shadowgraft.train.data import IGNORE, Example, assistant_spans, collate, encode, pack, read_records

from .tiny_lm import CHATML, assert_line_error, chatml_tokenizer, write_jsonl  # noqa: F401 (chatml_tokenizer is the tok fixture)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_shape_parses_to_the_same_conversation(tmp_path):
    want = ({"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four."})
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [dict(m) for m in want]},
        {"conversations": [{"from": "human", "value": "what is two plus two?"}, {"from": "gpt", "value": "four."}]},
        {"instruction": "what is two plus two?", "input": "", "output": "four."},
        {"text": "plain words"},
    ])
    recs = read_records(path)
    assert [r.kind for r in recs] == ["chat", "sharegpt", "alpaca", "text"]
    assert recs[0].messages == recs[1].messages == recs[2].messages == want
    assert recs[3].text == "plain words" and recs[3].messages == ()
    assert [r.line for r in recs] == [1, 2, 3, 4]


def test_alpaca_input_system_and_history_and_sharegpt_system(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Add", "input": "3 and 4", "output": "7", "system": "be brief", "history": [["hi", "hello"]]},
        {"system": "be kind", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]},
    ])
    a, s = read_records(path)
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert a.messages[0]["content"] == "be brief" and a.messages[3]["content"] == "Add\n\n3 and 4"
    assert a.messages[2]["content"] == "hello" and a.messages[4]["content"] == "7"
    assert s.messages[0] == {"role": "system", "content": "be kind"}


def test_blank_lines_are_skipped_but_count_towards_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [r.line for r in read_records(path)] == [1, 4]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON (Expecting ',' delimiter at column 14); fix or remove the line"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"prompt": "x", "completion": "y"}', "unknown record shape (keys: completion, prompt); use 'messages', "
                                           "'conversations', 'instruction'/'input'/'output' or 'text'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 has role 'robot'; use one of system, user, assistant, tool"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message, so nothing to learn from; add one or drop the line"),
    ('{"messages": [{"role": "user"}]}', "message 0 needs 'role' and 'content'"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}', "turn 0 is from 'alien'; use human, gpt, system or tool"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "message 0 content must be a string, got int"),
    ('{"text": ""}', "'text' must be a non-empty string"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    assert_line_error(read_records, tmp_path / "d.jsonl", '{"text": "fine"}\n{"text": "fine"}\n' + line + "\n", message)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ShadowgraftError, match="no records; write one JSON object per line"):
        read_records(tmp_path / "e.jsonl")


def test_prompt_tokens_carry_no_loss(tmp_path, tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two?"},
            {"role": "assistant", "content": "four."}, {"role": "user", "content": "and 3 + 4?"},
            {"role": "assistant", "content": "7"}]
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]))
    (ex,), dropped = encode(recs, tokenizer=tok, chat_template=CHATML, max_length=4096)
    assert dropped == 0 and len(ex.input_ids) == len(ex.labels)
    # The ids spell out exactly the rendered conversation.
    rendered = tok.apply_chat_template(msgs, chat_template=CHATML, tokenize=False)
    assert tok.decode(list(ex.input_ids)) == rendered
    # Labels are the ids on the two replies (with their end-of-turn marker) and IGNORE everywhere else.
    runs, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels):
        if lab == IGNORE:
            if cur:
                runs.append(tok.decode(cur))
                cur = []
        else:
            assert lab == i
            cur.append(i)
    runs.append(tok.decode(cur)) if cur else None
    assert runs == ["four.<|im_end|>\n", "7<|im_end|>\n"]
    prompt = tok.apply_chat_template(msgs[:2], chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert set(ex.labels[:n_prompt]) == {IGNORE}
    assert ex.n_targets == sum(1 for x in ex.labels if x != IGNORE)


def test_template_that_renders_the_last_turn_differently():
    # Like Qwen3's: the final reply gets an empty think block, earlier ones do not.
    def render(msgs, gen):
        out = ""
        for k, m in enumerate(msgs):
            think = "<think></think>" if m["role"] == "assistant" and k == len(msgs) - 1 else ""
            out += f"<{m['role']}>{think}{m['content']}</end>"
        return out + ("<assistant>" if gen else "")

    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    text, spans = assistant_spans(msgs, render, "d.jsonl:1")
    assert [text[s:e] for s, e in spans] == ["a1</end>", "<think></think>a2</end>"]


def test_plain_text_trains_on_every_token_and_ends_with_eos(tmp_path, tok):
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}]))
    (ex,), _ = encode(recs, tokenizer=tok, chat_template=None, max_length=64)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(list(ex.input_ids[:-1])) == "hello world"


def test_conversations_without_a_template_ask_for_one(tmp_path, tok):
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {"instruction": "a", "output": "b"}]))
    with pytest.raises(ShadowgraftError) as e:
        encode(recs, tokenizer=tok, chat_template=None, max_length=64, path="d.jsonl")
    assert str(e.value) == ("d.jsonl:2: conversations need a chat template, and the model's tokenizer has none; "
                            "pass --chat-template-from INSTRUCT_MODEL")


def test_truncation_and_dropping_records_with_no_target_left(tmp_path, tok):
    long_prompt = "the quick brown fox " * 20
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": long_prompt, "output": "four."},
        {"instruction": "hi", "output": "hello world " * 10},
    ]))
    full, _ = encode(recs, tokenizer=tok, chat_template=CHATML, max_length=10_000)
    prompts = [next(k for k, lab in enumerate(e.labels) if lab != IGNORE) for e in full]
    assert prompts[0] > prompts[1] + 4
    cut = prompts[1] + 3  # room for 3 reply tokens of the second record, none of the first
    examples, dropped = encode(recs, tokenizer=tok, chat_template=CHATML, max_length=cut)
    assert dropped == 1 and len(examples) == 1
    (ex,) = examples
    assert len(ex.input_ids) == cut and ex.input_ids == full[1].input_ids[:cut] and ex.labels == full[1].labels[:cut]
    assert ex.n_targets == 3


def test_packing_keeps_examples_whole_and_unlinked():
    exs = [Example((1, 2, 3), (IGNORE, 2, 3)), Example((4, 5), (4, 5)), Example((6, 7, 8, 9), (IGNORE, IGNORE, 8, 9)),
           Example((10,), (10,))]
    rows = pack(exs, max_length=6)
    assert [r.input_ids for r in rows] == [(1, 2, 3, 4, 5), (6, 7, 8, 9, 10)]
    # The first token of each later example is never a target (it would be "predicted" from the previous one).
    assert [r.labels for r in rows] == [(IGNORE, 2, 3, IGNORE, 5), (IGNORE, IGNORE, 8, 9, IGNORE)]
    # Positions restart with every example: transformers masks attention between them.
    assert [r.position_ids for r in rows] == [(0, 1, 2, 0, 1), (0, 1, 2, 3, 0)]


def test_collate_of_packed_rows_gives_positions_not_a_mask():
    b = collate([Example((5, 6, 7, 8), (IGNORE, 6, IGNORE, 8), (0, 1, 0, 1)), Example((9,), (9,), (0,))], pad_id=0)
    assert set(b) == {"input_ids", "position_ids", "labels"}
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 0, 0, 0]]
    # Padding is a segment of its own, after every real token.
    assert b["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    assert b["labels"].tolist() == [[IGNORE, 6, IGNORE, 8], [9, IGNORE, IGNORE, IGNORE]]


def test_collate_pads_right_and_masks():
    b = collate([Example((5, 6, 7), (IGNORE, 6, 7)), Example((8,), (8,))], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_a_line_that_is_not_utf8_is_named_and_a_bom_is_no_content(tmp_path):
    ok = b'{"text": "a"}\n'
    p = tmp_path / "d.jsonl"
    p.write_bytes(ok + ok + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(ShadowgraftError) as e:
        read_records(p)
    assert str(e.value) == f"{p}:3: not UTF-8 text (invalid start byte at byte 10 of the line); save the file as UTF-8"
    p.write_bytes(b"\xef\xbb\xbf" + ok)
    assert len(read_records(p)) == 1


def test_a_conversation_opening_with_the_assistant_is_refused(tmp_path):
    rows = [{"text": "a"}, {"text": "b"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"},
                          {"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}]
    p = tmp_path / "d.jsonl"
    assert_line_error(read_records, p, "".join(json.dumps(r) + "\n" for r in rows),
                      "the conversation starts with an assistant message; put the user turn it answers before it, "
                      "or drop the line")


def test_a_broken_chat_template_is_one_line_naming_the_record(tmp_path, tok):
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                                          {"role": "assistant", "content": "a"}]}]))
    with pytest.raises(ShadowgraftError) as e:
        encode(recs, tokenizer=tok, chat_template="{% for m in messages %}{{ m.content }", max_length=64, path="d.jsonl")
    assert str(e.value).startswith("d.jsonl:1: the chat template failed on this record (TemplateSyntaxError: ")
    assert str(e.value).endswith("); fix the template (--chat-template-from) or the record")
