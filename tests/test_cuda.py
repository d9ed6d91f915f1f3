"""The CUDA path must give the same bytes as the CPU path (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import shadowgraft
from shadowgraft.synthetic import Shape, make_trio

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_cuda_output_is_bit_identical_to_cpu(tmp_path, dtype, alpha):
    trio = make_trio(tmp_path / "in", shape=Shape(layers=2, hidden=256, intermediate=640, vocab=512), dtype=dtype, shard_bytes=500_000)
    kw = dict(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], alpha=alpha)
    shadowgraft.apply(**kw, output=tmp_path / "cpu", device="cpu")
    shadowgraft.apply(**kw, output=tmp_path / "cuda", device="cuda")
    files = sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors"))
    assert files
    for f in files:
        assert (tmp_path / "cpu" / f).read_bytes() == (tmp_path / "cuda" / f).read_bytes(), f

