"""The writer path: shard headers, copies and casts, read back by safetensors itself."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from shadowgraft import Checkpoint
from shadowgraft.engine import Engine
from shadowgraft.plan import items_with, plan_shards
from shadowgraft.writer import OutputDir, index_json

from .conftest import load

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64]

tensor_st = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 5), min_size=0, max_size=3),
)
name_st = st.text("abcdefghij._0123456789", min_size=1, max_size=12)


def _write(src, out, max_shard):
    ck = Checkpoint.open(src)
    shards = plan_shards(ck, items_with(ck, None, {}), max_shard)
    eng = Engine([ck])
    with OutputDir(out) as tmp:
        for s in shards:
            eng.write_shard(s, tmp / s.file)
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json(shards)))
    ck.close()
    return shards


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.dictionaries(name_st, tensor_st, min_size=1, max_size=8), max_shard=st.sampled_from([None, 1, 40, 10_000]),
       seed=st.integers(0, 2**16))
def test_round_trip(tmp_path_factory, spec, max_shard, seed):
    root = tmp_path_factory.mktemp("rt")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (dtype, shape) in spec.items():
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 100
        tensors[name] = (x > 0) if dtype == torch.bool else x.to(dtype)
    save_file(tensors, str(root / "in.safetensors"))
    shards = _write(root / "in.safetensors", root / "out", max_shard)
    got = load(root / "out")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    if len(shards) > 1:
        idx = json.loads((root / "out" / "model.safetensors.index.json").read_text())
        assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
        assert {k: (root / "out" / f).is_file() for k, f in idx["weight_map"].items()} == {k: True for k in tensors}


def test_header_has_format_metadata_and_alignment(tmp_path):
    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(5, dtype=torch.float64), "c": torch.ones(1, dtype=torch.int8)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    _write(tmp_path / "in.safetensors", tmp_path / "out", None)
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0
    assert head["__metadata__"] == {"format": "pt"}
    for k, v in head.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % tensors[k].element_size() == 0


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    try:
        with OutputDir(out) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
