"""Planning: shard layout, sizes, selection, refusals."""

import pytest

from shadowgraft import Checkpoint, ShadowgraftError
from shadowgraft.plan import plan_graft, select
from shadowgraft.shards import parse_size
from shadowgraft.synthetic import Shape, make_trio


@pytest.mark.parametrize("text,n", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("2kb", 2000), ("123", 123), ("1.5GB", 1_500_000_000)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_parse_size_rejects_garbage():
    with pytest.raises(ShadowgraftError, match="size 'lots' not understood"):
        parse_size("lots")


def test_reshard_respects_limit_and_keeps_alignment(tmp_path):
    trio = make_trio(tmp_path, shape=Shape(layers=2))
    ins, base, tuned = (Checkpoint.open(trio[k]) for k in ("instruct", "base", "tuned"))
    plan = plan_graft(ins, base=base, tuned=tuned, max_shard_size=50_000, dtype=None)
    assert len(plan.shards) > 1
    for s in plan.shards:
        assert s.nbytes <= 50_000 or len(s.items) == 1
        widths = [i.nbytes // max(i.src.numel, 1) for i in s.items]
        assert widths == sorted(widths, reverse=True)
    assert [i.name for i in plan.items] != [] and sorted(i.name for i in plan.items) == sorted(ins.tensors)


def test_select_rejects_bad_regex(tmp_path):
    trio = make_trio(tmp_path)
    with pytest.raises(ShadowgraftError, match=r"--include '\(' is not a valid regular expression"):
        select(Checkpoint.open(trio["instruct"]), include=["("])


def test_missing_tensor_in_base_is_named(tmp_path):
    trio = make_trio(tmp_path / "a", shape=Shape(layers=2))
    short = make_trio(tmp_path / "b", shape=Shape(layers=1))
    ins, tuned = Checkpoint.open(trio["instruct"]), Checkpoint.open(trio["tuned"])
    with pytest.raises(ShadowgraftError, match=r"^7 tensor\(s\) missing from base \(.*/b/base\): model\.layers\.1\.mlp\.down_proj\.weight, .*, \.\.\.; exclude them with --exclude REGEX"):
        plan_graft(ins, base=Checkpoint.open(short["base"]), tuned=tuned)


def test_tensors_only_in_tuned_are_warned(tmp_path):
    big = make_trio(tmp_path / "a", shape=Shape(layers=2))
    small = make_trio(tmp_path / "b", shape=Shape(layers=1))
    plan = plan_graft(Checkpoint.open(small["instruct"]), base=Checkpoint.open(big["base"]), tuned=Checkpoint.open(big["tuned"]))
    assert any(w.startswith("9 tensor(s) only in base are ignored") for w in plan.warnings)
    assert any(w.startswith("9 tensor(s) only in tuned are ignored") for w in plan.warnings)


def test_tensors_left_at_instruct_are_a_note_not_a_warning(tmp_path):
    trio = make_trio(tmp_path, shape=Shape(layers=2))
    ins, base, tuned = (Checkpoint.open(trio[k]) for k in ("instruct", "base", "tuned"))
    plan = plan_graft(ins, base=base, tuned=tuned)
    assert plan.warnings == ()
    assert plan.notes == ("7 tensor(s) outside --scope linear/--include/--exclude keep instruct's values: "
                          "lm_head.weight, model.embed_tokens.weight, model.layers.0.input_layernorm.weight, ...",)


def _with_int_tensors(folder, seed: int):
    """A block with a float weight next to a quantized-style int32 ``qweight`` and a bool mask (both 2-D)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
               "model.layers.0.self_attn.k_proj.qweight": torch.arange(32, dtype=torch.int32).reshape(4, 8),
               "model.layers.0.self_attn.mask": torch.ones(8, 8, dtype=torch.bool)}, str(folder / "model.safetensors"))
    return Checkpoint.open(folder)


@pytest.mark.parametrize("scope", ["linear", "attn", "all"])
def test_integer_and_bool_matrices_in_a_block_are_copied(tmp_path, scope):
    ins, base, tuned = (_with_int_tensors(tmp_path / k, i) for i, k in enumerate(("instruct", "base", "tuned")))
    plan = plan_graft(ins, base=base, tuned=tuned, scope=scope)
    actions = {i.name: i.action for i in plan.items}
    assert actions == {"model.layers.0.self_attn.q_proj.weight": "graft", "model.layers.0.self_attn.k_proj.qweight": "copy",
                       "model.layers.0.self_attn.mask": "copy"}
    pick = select(ins, scope=scope, floats_only=False)
    assert pick("model.layers.0.self_attn.k_proj.qweight") and pick("model.layers.0.self_attn.mask")


def test_include_matching_nothing_is_an_error_naming_it(tmp_path):
    trio = make_trio(tmp_path, shape=Shape(layers=2))
    ins = Checkpoint.open(trio["instruct"])
    with pytest.raises(ShadowgraftError, match=r"^--include 'q_prj' matches no floating tensor inside --scope linear of "
                                               rf".*/instruct \(names look like 'model\.layers\.0\.mlp\.down_proj\.weight'\); "
                                               r"fix the pattern .* or widen --scope$"):
        select(ins, include=["q_proj", "q_prj"])
    # Outside the scope is nothing too: embeddings need --scope all.
    with pytest.raises(ShadowgraftError, match=r"^--include 'embed' matches no floating tensor inside --scope linear"):
        select(ins, include=["embed"])
    assert select(ins, include=["embed"], scope="all")("model.embed_tokens.weight")
