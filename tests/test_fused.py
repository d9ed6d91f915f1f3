"""The fused graft kernel: the general path's bits on every dtype and alpha, and every NaN/Inf seen."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from shadowgraft import Checkpoint
from shadowgraft import fused
from shadowgraft.engine import Engine
from shadowgraft.plan import plan_graft

from .conftest import load


def _reference(x, base, term, alpha, out_dtype, wd=torch.float32):
    """float64 emulation of the op sequence in ``wd``: for fp32, each op computed in float64, then rounded to fp32.

    Exact for +, - and * (53 >= 2 * 24 + 2 bits, so rounding twice equals
    rounding once); the scalar alpha is an fp32 operand, as in torch.
    """
    f32 = (lambda v: v.to(torch.float32).to(torch.float64)) if wd == torch.float32 else (lambda v: v)  # noqa: E731
    d = term.double()
    if base is not None:
        d = f32(d - base.double())
    if alpha != 1.0:
        d = f32(d * f32(torch.tensor(alpha, dtype=torch.float64)))
    return f32(x.double() + d).to(out_dtype)


def _inputs(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    # Several scales, so that the rounding of the subtraction and of the sum both matter.
    x = b + torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 1, (n,), generator=g)
    t = b + torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 1, (n,), generator=g)
    return x.to(dtype), b.to(dtype), t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.5, -1.3, 3.7, 1e-3])
@pytest.mark.parametrize("with_base", [True, False])
def test_kernel_matches_the_fp32_op_sequence_bit_for_bit(dtype, alpha, with_base):
    n = 50_000
    x, b, t = _inputs(n, dtype)
    base = b if with_base else None
    want = _reference(x, base, t, alpha, dtype)
    for kernel in (fused.graft_kernel(), fused._graft):  # TorchScript and plain Python alike
        out = torch.empty(n, dtype=dtype)
        check = kernel(x, base, t, alpha, out, torch.empty(3, n), dtype == torch.bfloat16)
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
        assert math.isfinite(float(check))


def test_the_kernel_is_compiled_where_torchscript_works():
    assert isinstance(fused.graft_kernel(), torch.jit.ScriptFunction)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("case", ["clean", "nan", "inf", "bf16_overflow", "huge_finite", "fp16_overflow"])
def test_check_sum_is_nonfinite_whenever_the_output_is(case):
    n = 1000
    dtype = torch.float16 if case == "fp16_overflow" else torch.bfloat16
    x, b, t = (torch.full((n,), v, dtype=dtype) for v in (1.0, 0.5, 0.75))
    if case == "nan":
        t[3] = math.nan
    elif case == "inf":
        x[7] = -math.inf
    elif case == "bf16_overflow":
        # Finite in fp32 (3.3995e38 < 3.4028e38), but past bf16's largest value plus half an ulp: rounds to Inf.
        x[5] = torch.finfo(torch.bfloat16).max
        t[5], b[5] = 1e36, 0.0
    elif case == "huge_finite":
        # Squares overflow fp32, the values do not: the check fires, the exact count finds nothing.
        x[:] = 1e30
    elif case == "fp16_overflow":
        x[9], t[9], b[9] = 60000.0, 10000.0, 0.0
    out = torch.empty(n, dtype=dtype)
    check = fused.graft_kernel()(x, b, t, 1.0, out, torch.empty(3, n), dtype == torch.bfloat16)
    want = _reference(x, b, t, 1.0, dtype)
    assert torch.equal(_bits(out), _bits(want))
    bad = int((~torch.isfinite(want)).sum())
    assert bad == {"clean": 0, "nan": 1, "inf": 1, "bf16_overflow": 1, "huge_finite": 0, "fp16_overflow": 1}[case]
    # Non-finite for every bad output; for huge finite values too (a false alarm costs only an exact count).
    assert math.isfinite(float(check)) == (case == "clean")


def _trio(tmp_path, dtypes, n=20_011, bad=False):
    x, b, t = _inputs(n, torch.float64, seed=1)
    if bad:
        t[11], x[12] = math.nan, math.inf
    vals = {"instruct": x, "base": b, "tuned": t}
    cks = {}
    for k, v in vals.items():
        p = tmp_path / f"{k}.safetensors"
        save_file({"model.layers.0.mlp.up_proj.weight": v.view(-1, 1).to(dtypes[k]).contiguous(),
                   "model.layers.0.self_attn.q_proj.weight": (2 * v[:999]).view(-1, 1).to(dtypes[k]).contiguous(),
                   "model.norm.weight": torch.ones(3, dtype=dtypes[k])}, str(p))
        cks[k] = Checkpoint.open(p)
    return cks


_DTYPES = {
    "bf16": dict.fromkeys(("instruct", "base", "tuned"), torch.bfloat16),
    "fp16": dict.fromkeys(("instruct", "base", "tuned"), torch.float16),
    "fp32": dict.fromkeys(("instruct", "base", "tuned"), torch.float32),
    "bf16+fp32 tuned": {"instruct": torch.bfloat16, "base": torch.float32, "tuned": torch.float32},
}


@pytest.mark.parametrize("dtypes", list(_DTYPES))
@pytest.mark.parametrize("alpha", [1.0, 0.35, -2.0])
def test_engine_output_and_counts_are_the_general_paths(tmp_path, monkeypatch, dtypes, alpha):
    cks = _trio(tmp_path, _DTYPES[dtypes], bad=alpha == 1.0)
    plan = plan_graft(cks["instruct"], base=cks["base"], tuned=cks["tuned"], alpha=alpha)
    runs = {}
    for mode in ("fused", "general"):
        calls = []
        if mode == "general":
            monkeypatch.setattr(Engine, "_fusable", lambda self, it: False)
        else:
            real = Engine._fused
            monkeypatch.setattr(Engine, "_fused", lambda self, *a: calls.append(1) or real(self, *a))
        eng = Engine(list(cks.values()), chunk=4099)
        eng.write_shard(plan.shards[0], tmp_path / f"{mode}.safetensors")
        runs[mode] = eng.stats
        assert bool(calls) == (mode == "fused")
        monkeypatch.undo()
    assert (tmp_path / "fused.safetensors").read_bytes() == (tmp_path / "general.safetensors").read_bytes()
    assert runs["fused"].nonfinite == runs["general"].nonfinite
    bad = {"model.layers.0.mlp.up_proj.weight": 2, "model.layers.0.self_attn.q_proj.weight": 2}
    assert runs["fused"].nonfinite == (bad if alpha == 1.0 else {})
    # And against the float64 emulation (the output dtype is instruct's).
    got = load(tmp_path / "fused.safetensors")["model.layers.0.mlp.up_proj.weight"].view(-1)
    ins = {k: load(c.files[0])["model.layers.0.mlp.up_proj.weight"].view(-1) for k, c in cks.items()}
    wide = any(v.dtype == torch.float32 for v in ins.values())
    want = _reference(ins["instruct"], ins["base"], ins["tuned"], alpha, got.dtype, torch.float64 if wide else torch.float32)
    assert torch.equal(_bits(got), _bits(want))
