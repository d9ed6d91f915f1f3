"""Prefix mappings between the name sets of a text-only model and its multimodal sibling."""

import time

import pytest

from shadowgraft.errors import ShadowgraftError
from shadowgraft.prefix import Rename, find

TEXT = [f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj", "input_layernorm")]
TEXT += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
VISION = [f"vision_tower.encoder.layers.{i}.mlp.fc1.weight" for i in range(2)] + ["multi_modal_projector.linear_1.weight"]


def test_names_that_already_match_need_no_rule():
    assert find(TEXT, TEXT + VISION) is None


def test_transformers4_layout_one_prefix_for_everything():
    # LLaVA / Gemma 3 as transformers 4 saved them: every language tensor under language_model.
    target = [f"language_model.{n}" for n in TEXT] + VISION
    rule = find(TEXT, target)
    assert rule == Rename("", "language_model.")
    assert {rule(n) for n in TEXT} == set(target) - set(VISION)


def test_transformers5_layout_leaves_lm_head_alone():
    target = [n.replace("model.", "model.language_model.", 1) for n in TEXT] + [f"model.{n}" for n in VISION]
    assert "lm_head.weight" in target
    rule = find(TEXT, target)
    assert rule == Rename("model.", "model.language_model.")
    assert rule("lm_head.weight") == "lm_head.weight"
    assert sorted(rule(n) for n in TEXT) == sorted(n for n in target if "vision" not in n and "projector" not in n)


def test_rules_with_the_same_effect_are_one_mapping():
    # Tied embeddings, no lm_head: ''->language_model. and model.->language_model.model. pair the same names.
    text = [n for n in TEXT if n != "lm_head.weight"]
    assert find(text, [f"language_model.{n}" for n in text] + VISION) == Rename("", "language_model.")


def test_the_other_direction_drops_the_prefix():
    assert find([f"transformer.{n}" for n in TEXT], TEXT) == Rename("transformer.", "")


def test_partial_mapping_is_refused_naming_the_unpaired():
    target = [f"language_model.{n}" for n in TEXT if "layers.2." not in n] + VISION
    with pytest.raises(ShadowgraftError, match=r"tuned's tensor names match instruct's only in part under prefix change "
                                               r"'' -> 'language_model.': 3 of 12 tuned tensor\(s\) have no partner: "
                                               r"model\.layers\.2\.input_layernorm\.weight, model\.layers\.2\.mlp\.down_proj\.weight, "
                                               r"model\.layers\.2\.self_attn\.q_proj\.weight; check"):
        find(TEXT, target)


def test_ambiguous_mapping_is_refused():
    # Two language models side by side: the tune pairs with either.
    target = [f"a.{n}" for n in TEXT] + [f"b.{n}" for n in TEXT]
    with pytest.raises(ShadowgraftError, match=r"under several prefix changes \('' -> 'a\.', '' -> 'b\.'\); the pairing is ambiguous"):
        find(TEXT, target, what="tuned", onto="instruct")


def test_unrelated_names_give_no_rule():
    # Nothing pairs better than the names as they are: the caller reports what is missing.
    assert find(["x.weight", "y.weight"], ["a.b", "c.d"]) is None
    # One tensor missing under identity and no rule helps: still the caller's to report.
    assert find(TEXT, TEXT[1:]) is None


def test_many_tensors_stay_fast():
    # DeepSeek-V3 has ~90K tensors: the common tail "weight" must not cost a full check per target name.
    text = [f"model.layers.{i}.mlp.experts.{e}.{m}.weight" for i in range(30) for e in range(64) for m in ("gate_proj", "up_proj")]
    target = [n.replace("model.", "model.language_model.", 1) for n in text]
    t0 = time.perf_counter()
    assert find(text, target) == Rename("model.", "model.language_model.")
    assert time.perf_counter() - t0 < 10


def test_transformers5_memory_names_onto_transformers4_files():
    # A PEFT adapter trained on LLaVA as transformers 5 holds it, grafted onto the files' layout.
    held = [n.replace("model.", "model.language_model.", 1) for n in TEXT if n != "lm_head.weight"]
    files = [f"language_model.{n}" for n in TEXT if n != "lm_head.weight"] + VISION
    assert find(held, files) == Rename("model.language_model.", "language_model.model.")


def test_rules_never_rewrite_a_component_or_move_a_block():
    assert find(["x.layers.0.q.weight"], ["model.layers.0.q.weight"]) is None
    assert find(["model.layers.7.q.weight", "model.layers.0.q.weight"], ["model.layers.1.q.weight", "model.layers.0.q.weight"]) is None
