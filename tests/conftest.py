"""Shared fixtures: tiny checkpoints built in tmp_path, and a float64 reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shadowgraft.synthetic import Shape, make_trio

# Tests must never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def load(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors itself (an independent reader)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def ulp_distance(got: torch.Tensor, ref64: torch.Tensor) -> torch.Tensor:
    """How many representable values of ``got.dtype`` lie between ``got`` and the correctly rounded ``ref64``."""
    want = ref64.to(got.dtype)
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[got.dtype]

    def ordered(x):
        i = x.contiguous().view(ints).to(torch.int64)
        # Map sign-magnitude floats onto a monotone integer line.
        top = torch.iinfo(ints).min
        return torch.where(i < 0, top - i, i)

    return (ordered(got) - ordered(want)).abs()


def assert_exact(got: torch.Tensor, ref64: torch.Tensor, *, min_exact: float = 0.9999, max_ulp: int = 1) -> None:
    d = ulp_distance(got, ref64)
    exact = float((d == 0).double().mean()) if d.numel() else 1.0
    assert exact >= min_exact, f"only {exact:.6f} of elements bit-exact"
    assert int(d.max()) <= max_ulp if d.numel() else True, f"max ulp error {int(d.max())}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run many times faster without intra-op threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def trio(tmp_path):
    """A sharded bf16 Llama-shaped base/instruct/tuned trio."""
    return make_trio(tmp_path / "in", shape=Shape(layers=3, hidden=64, intermediate=96, vocab=128), shard_bytes=120_000)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``shadowgraft ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from shadowgraft.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def deny(monkeypatch, owner, attr: str, suffix: str) -> None:
    """Make ``owner.attr`` (``builtins.open``, ``os.open``) fail with EACCES for paths ending in ``suffix``."""
    real = getattr(owner, attr)

    def denied(path, *a, **k):
        if str(path).endswith(suffix):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(owner, attr, denied)
