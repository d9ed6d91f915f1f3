"""``save_tensors``: in-memory tensors -> safetensors shards that safetensors itself reads back."""

from __future__ import annotations

import json

import torch

from shadowgraft import Checkpoint
from shadowgraft.save import save_tensors

from .conftest import load


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=g),
        "b.weight": torch.randn(16, 16, generator=g).bfloat16(),
        "c.scalar": torch.tensor(3.5),
        "d.empty": torch.zeros(0, 4),
        "e.mask": torch.tensor([True, False, True]),
        "f.ids": torch.arange(5, dtype=torch.int64),
    }


def test_single_file_round_trip(tmp_path):
    t = tensors()
    assert save_tensors(tmp_path, t) == ["model.safetensors"]
    got = load(tmp_path)
    assert got.keys() == t.keys() and all(got[k].dtype == t[k].dtype and torch.equal(got[k], t[k]) for k in t)


def test_shards_index_and_dtype_conversion(tmp_path):
    t = tensors()
    files = save_tensors(tmp_path, t, max_shard_size=600, dtypes={"a.weight": torch.bfloat16}, metadata={"format": "pt", "k": "v"})
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(t) and set(idx["weight_map"].values()) == set(shards)
    got = load(tmp_path)
    assert got["a.weight"].dtype == torch.bfloat16 and torch.equal(got["a.weight"], t["a.weight"].bfloat16())
    assert all(torch.equal(got[k], t[k]) for k in t if k != "a.weight")
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    for f in shards:
        held = [k for k, v in idx["weight_map"].items() if v == f]
        size = sum(got[k].numel() * got[k].element_size() for k in held)
        assert size <= 600 or len(held) == 1, (f, held)  # only a single oversize tensor may exceed the limit
    with Checkpoint.open(tmp_path) as ck:
        assert len(ck) == len(t) and ck.headers[0].metadata == {"format": "pt", "k": "v"}
