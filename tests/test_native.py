"""The compiled one-pass kernel (``_native.c``) against float64 and against the TorchScript kernel."""

from __future__ import annotations

import errno
import math
import os
import shutil
import sysconfig
import threading

import pytest
import torch

from shadowgraft import metrics, native

built = pytest.mark.skipif(not native.available(), reason="shadowgraft._native is not built here")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def run(a, b, t=None, step=1 << 18):
    parts = torch.zeros((-(-a.numel() // step) or 1, metrics.COLS), dtype=torch.float64)
    assert native.sums(a, b, t, parts, step)
    return parts


def torch_run(a, b, t=None, step=1 << 18):
    parts = torch.zeros((-(-a.numel() // step) or 1, metrics.COLS), dtype=torch.float64)
    metrics._kernel(a, b, t, torch.empty(metrics.scratch_elements(a.numel(), step)), parts, step)
    return parts


@built
def test_every_fp16_code_converts_as_torch_does():
    # One element a step: row i holds |x_i| and x_i^2 of code i alone.
    a = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = a.float()
    rows = run(a, torch.zeros_like(a), step=1)
    got, want = rows[:, metrics.ABS_A], x.abs().double()
    same = (got == want) | (got.isnan() & want.isnan())
    assert bool(same.all()), a[~same][:5]
    sq = rows[:, metrics.SQ_A]
    assert bool(((sq == (x * x).double()) | sq.isnan()).all())
    assert int(x.isnan().sum()) == 2046 and bool((want[x.isnan()]).isnan().all())


@built
def test_bf16_and_f64_convert_as_torch_does():
    g = torch.Generator().manual_seed(1)
    f64 = torch.randn(5000, generator=g, dtype=torch.float64) * torch.logspace(-40, 30, 5000, dtype=torch.float64)
    rows = run(f64, torch.zeros_like(f64), step=1)
    assert torch.equal(rows[:, metrics.ABS_A], f64.float().abs().double())  # rounded to nearest even once
    bf = torch.randn(5000, generator=g).bfloat16()
    assert torch.equal(run(bf, torch.zeros_like(bf), step=1)[:, metrics.ABS_A], bf.float().abs().double())


@built
@pytest.mark.parametrize("da,db", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float64)])
@pytest.mark.parametrize("n", [0, 1, 7, 255, 256, 257, 100_003])
def test_sums_against_float64(da, db, n):
    g = torch.Generator().manual_seed(n)
    a = (0.02 * torch.randn(n, generator=g)).to(da)
    b = (a.double() + 4e-4 * torch.randn(n, generator=g, dtype=torch.float64)).to(db)
    t = (a.double() + 2e-4 * torch.randn(n, generator=g, dtype=torch.float64)).to(da)
    step = 4099
    got = run(a, b, t, step=step)
    # The reference: the fp32 values the kernel sees, every operation in float64.
    A, B, T = a.float().double(), b.float().double(), t.float().double()
    D, E = (a.float() - b.float()).double(), (t.float() - a.float()).double()  # one fp32 subtraction each
    for i, s in enumerate(range(0, max(n, 1), step)):
        sl = slice(s, s + step)
        want = {
            metrics.ABS_A: A[sl].abs().sum(), metrics.ABS_B: B[sl].abs().sum(), metrics.ABS_D: D[sl].abs().sum(),
            metrics.SQ_A: (A[sl] ** 2).sum(), metrics.SQ_B: (B[sl] ** 2).sum(), metrics.SQ_D: (D[sl] ** 2).sum(),
            metrics.SQ_T: (E[sl] ** 2).sum(), metrics.NEG_DOT: (E[sl] * D[sl]).sum(),
        }
        for col, w in want.items():
            scale = float(A[sl].abs().sum() + B[sl].abs().sum() + T[sl].abs().sum()) if col == metrics.NEG_DOT else float(w)
            assert abs(float(got[i, col]) - float(w)) <= 1e-6 * abs(scale) + 1e-30, (col, float(got[i, col]), float(w))
        assert got[i, metrics.N_DIFF] == int((D[sl] != 0).sum())
        assert got[i, metrics.MAX_ABS] == (float(D[sl].abs().max()) if D[sl].numel() else 0.0)
    assert got.shape[0] == (-(-n // step) or 1)


@built
def test_native_and_torchscript_kernels_agree():
    g = torch.Generator().manual_seed(9)
    a = (0.02 * torch.randn(600_001, generator=g)).bfloat16()
    b = (a.float() + 4e-4 * torch.randn(600_001, generator=g)).bfloat16()
    t = (a.float() + 1e-4 * torch.randn(600_001, generator=g)).bfloat16()
    x, y = run(a, b, t), torch_run(a, b, t)
    exact = [metrics.N_DIFF, metrics.MAX_ABS]
    assert torch.equal(x[:, exact], y[:, exact])
    assert torch.allclose(x, y, rtol=1e-6, atol=0)


@built
def test_threads_run_at_once_and_get_the_same_bits():
    # The kernel releases the GIL: four threads, each its own output, each equal to a lone run.
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2_000_000, generator=g).bfloat16(), torch.randn(2_000_000, generator=g).bfloat16()
    lone = run(a, b)
    outs = [None] * 4

    def go(i):
        outs[i] = run(a, b)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(o, lone) for o in outs)


@pytest.fixture
def each_width():
    """Runs the test body's sums at every vector width this CPU has, restoring the widest after."""
    widest = native.widths()[0]
    yield native.widths()
    native._native.use_width(widest)


@built
def test_every_vector_width_gives_the_same_bits(each_width, tmp_path):
    # The lanes are in the source, so 4-, 8- and 16-wide vectors must agree bit for bit: partial blocks, step
    # boundaries, every dtype, NaN, Inf, zeros, subnormals and an fp32 overflow of A - B.
    g = torch.Generator().manual_seed(12)
    n = 2 * native.PIECE + 777
    x = torch.randn(n, generator=g) * torch.logspace(-42, 37, n)
    x[::97], x[5::211], x[7::331], x[11::401] = math.nan, math.inf, -math.inf, 0.0
    y = torch.where(torch.rand(n, generator=g) < 0.3, x, x + 1e-3 * torch.randn(n, generator=g))
    y[:64] = -3e38
    x[:64] = 3e38
    t = x + 1e-3 * torch.randn(n, generator=g)
    cases = [(x, y, None), (x, y, t), (x[64:].bfloat16(), y[64:].bfloat16(), t[64:].bfloat16()),
             (x[64:].half(), y[64:].bfloat16(), None), (x.double(), y, t.half())]
    f = tmp_path / "x"
    f.write_bytes(x.bfloat16().view(torch.uint8).numpy().tobytes() + y.bfloat16().view(torch.uint8).numpy().tobytes())
    buf = torch.empty(native.scratch_bytes(), dtype=torch.uint8)

    def from_file():
        parts = metrics.new_parts(n, 4099)
        fd = os.open(f, os.O_RDONLY)
        try:
            assert native.sums_files([(fd, 0, torch.bfloat16), (fd, 2 * n, torch.bfloat16)], n, 4099, parts, buf) is None
        finally:
            os.close(fd)
        return parts

    results = {}
    for w in each_width:
        assert native._native.use_width(w) in each_width
        results[w] = [run(a, b, c, step=step) for a, b, c in cases for step in (1 << 18, 4099, 1)] + [from_file()]
    first = results[each_width[0]]
    assert any(bool(r.isnan().any()) for r in first) and any(bool(r.isinf().any()) for r in first)
    for w, got in results.items():
        assert all(torch.equal(r, s) or torch.equal(r.isnan(), s.isnan()) and torch.equal(r.nan_to_num(), s.nan_to_num())
                   for r, s in zip(got, first)), w


@built
def test_the_widest_width_runs_and_others_are_refused(each_width):
    assert each_width[0] == max(each_width) and 4 in each_width
    with pytest.raises(ValueError, match="width 3"):
        native._native.use_width(3)
    assert native.widths() == each_width  # a refused width changes nothing


@built
def test_what_it_declines(monkeypatch):
    a = torch.ones(10)
    parts = torch.zeros((1, metrics.COLS), dtype=torch.float64)
    assert not native.sums(a[::2], torch.ones(5), None, parts, 1 << 18)  # not contiguous
    assert not native.sums(torch.ones(10, dtype=torch.int32), torch.ones(10, dtype=torch.int32), None, parts, 1 << 18)
    assert not native.sums(a, torch.ones(10), None, torch.zeros((2, metrics.COLS), dtype=torch.float64), 1 << 18)
    monkeypatch.setenv("SHADOWGRAFT_NATIVE", "0")
    assert not native.available() and not native.sums(a, a, None, parts, 1 << 18) and native.widths() == []
    # range_sums then runs the TorchScript kernel and gets the same answer.
    s, _ = metrics.range_sums(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, 2.0, 0.0]))
    assert (s.abs_a, s.abs_b, s.abs_d, s.sq_d, s.max_abs, s.n_diff) == (6, 3, 7, 25, 4, 2)


@built
def test_reading_files_gives_the_bits_of_summing_memory(tmp_path):
    # Odd byte offsets, lengths that are not multiples of a piece or a block, mixed dtypes.
    g = torch.Generator().manual_seed(4)
    n = 3 * native.PIECE + 1000
    a = (0.02 * torch.randn(n, generator=g)).bfloat16()
    b = (a.float() + 4e-4 * torch.randn(n, generator=g)).to(torch.float16)
    t = (a.float() + 1e-4 * torch.randn(n, generator=g)).bfloat16()
    fds = []
    for name, x, pad in (("a", a, 3), ("b", b, 7), ("t", t, 0)):
        f = tmp_path / name
        f.write_bytes(b"\x01" * pad + x.view(torch.uint8).numpy().tobytes())
        fds.append((os.open(f, os.O_RDONLY), pad, x.dtype))
    buf = torch.empty(native.scratch_bytes(), dtype=torch.uint8)
    try:
        for step in (1 << 18, 4099, n):
            for inputs, mem in ((fds[:2], (a, b, None)), (fds, (a, b, t))):
                parts = metrics.new_parts(n, step)
                assert native.sums_files(inputs, n, step, parts, buf) is None
                assert torch.equal(parts, run(*mem, step=step)), step
        # A file that ends early names its input; a bad descriptor gives its errno.
        short = metrics.new_parts(n + 10, 1 << 18)
        assert native.sums_files([fds[0], fds[1], fds[2]], n + 10, 1 << 18, short, buf) == (0, -1)
        assert native.sums_files([fds[0], (9999, 0, torch.float16)], n, 1 << 18, short, buf) == (1, errno.EBADF)
    finally:
        for fd, _, _ in fds:
            os.close(fd)


def test_built_wherever_a_c_compiler_is():
    # The extension is optional so that installs without a compiler still work; with one, a failed build is a bug.
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) here")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no Python headers here")
    assert native._native is not None, "shadowgraft._native did not build: run `pip install -e .` and read its output"


@built
@pytest.mark.parametrize("alpha", [1.0, 0.5, -1.3, 3.7, 1e-3, 0.1])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float16,) * 3, (torch.bfloat16, torch.float16, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16, torch.float32)])  # the last: an fp32 stored delta
@pytest.mark.parametrize("with_base", [True, False])
def test_graft_gives_the_torchscript_kernels_bits(alpha, dtypes, with_base):
    from shadowgraft import fused

    n = 50_003
    g = torch.Generator().manual_seed(11)
    b64 = torch.randn(n, generator=g, dtype=torch.float64)
    # Several scales, so that the rounding of the subtraction and of the sum both matter; and every special value.
    x64 = b64 + torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 1, (n,), generator=g)
    t64 = b64 + torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 1, (n,), generator=g)
    x64[:6] = torch.tensor([math.nan, math.inf, -math.inf, 3.3e38, -3.3e38, 0.0], dtype=torch.float64)
    t64[6:9] = torch.tensor([math.nan, math.inf, 6e4], dtype=torch.float64)
    x, b, t = (v.to(d) for v, d in zip((x64, b64, t64), dtypes))
    base = b if with_base else None
    out = torch.empty(n, dtype=torch.bfloat16)
    bad = native.graft(x, base, t, alpha, out)
    want = torch.empty(n, dtype=torch.bfloat16)
    fused._graft(x, base, t, alpha, want, torch.empty(3, n), True)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert bad == int((~torch.isfinite(want)).sum()) and bad >= 5


@built
def test_graft_declines_what_it_does_not_compute():
    x = torch.ones(8, dtype=torch.bfloat16)
    assert native.graft(x, x, x, 1.0, torch.empty(8, dtype=torch.float16)) is None  # fp16 output
    assert native.graft(x.double(), x, x, 1.0, torch.empty(8, dtype=torch.bfloat16)) is None  # fp64 input
    assert native.graft(x, x, x[::2], 1.0, torch.empty(8, dtype=torch.bfloat16)) is None  # lengths differ


@built
def test_tables_of_the_wrong_size_are_refused_before_the_kernel_writes():
    a = torch.ones(10, dtype=torch.bfloat16)
    assert not native.sums(a, a, None, torch.zeros((1, metrics.COLS - 1), dtype=torch.float64), 1 << 18)
    assert not native.sums(a, a, None, torch.zeros((1, metrics.COLS), dtype=torch.float32), 1 << 18)
    buf = torch.empty(native.scratch_bytes(), dtype=torch.uint8)
    with pytest.raises(ValueError, match="sums_files"):
        native.sums_files([(0, 0, torch.bfloat16)] * 2, 10, 4, metrics.new_parts(10, 8), buf)
    with pytest.raises(ValueError, match="sums_files"):
        native.sums_files([(0, 0, torch.bfloat16)] * 2, 10, 4, metrics.new_parts(10, 4), buf[:100])
    empty = torch.empty(0, dtype=torch.bfloat16)
    assert native.graft(empty, empty, empty, 1.0, torch.empty(0, dtype=torch.bfloat16)) == 0


@built
def test_the_engine_grafts_bf16_models_and_their_stored_deltas_here(tmp_path, monkeypatch):
    import shadowgraft
    from shadowgraft.diff import diff
    from shadowgraft.synthetic import make_trio

    trio = make_trio(tmp_path / "in", dtype=torch.bfloat16)
    terms = []
    real = native.graft
    monkeypatch.setattr(native, "graft", lambda *a: terms.append(a[2].dtype) or real(*a))
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "full")
    assert terms and set(terms) == {torch.bfloat16}
    terms.clear()
    deltas = []
    real_delta = native.delta
    monkeypatch.setattr(native, "delta", lambda *a: deltas.append(a[0].dtype) or real_delta(*a))
    diff(base=trio["base"], tuned=trio["tuned"], output=tmp_path / "delta")
    assert deltas and set(deltas) == {torch.bfloat16}
    shadowgraft.apply(instruct=trio["instruct"], delta=tmp_path / "delta", output=tmp_path / "via")
    # The stored delta is fp32 (the working dtype of a bf16 graft), and the output the same bytes.
    assert terms and set(terms) == {torch.float32}
    assert (tmp_path / "full" / "model.safetensors").read_bytes() == (tmp_path / "via" / "model.safetensors").read_bytes()


@built
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.float16, torch.bfloat16)])
def test_delta_is_the_exact_difference_rounded_once(dtypes):
    g = torch.Generator().manual_seed(5)
    b64 = torch.randn(30_011, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 3, (30_011,), generator=g)
    t64 = b64 + torch.randn(30_011, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 3, (30_011,), generator=g)
    b64[:5] = torch.tensor([math.nan, math.inf, 1.0, 3e38, -math.inf], dtype=torch.float64)
    t64[:5] = torch.tensor([1.0, math.inf, math.nan, -3e38, -math.inf], dtype=torch.float64)
    b, t = b64.to(dtypes[0]), t64.to(dtypes[1])
    out = torch.empty(30_011)
    bad = native.delta(b, t, out)
    want = (t.double() - b.double()).float()  # exact in float64, rounded once
    same = (out == want) | (out.isnan() & want.isnan())
    assert bool(same.all())
    assert bad == int((~torch.isfinite(want)).sum()) >= 4  # NaN - x, inf - inf, x - NaN, -3e38 - 3e38 (bf16 only) ...
    assert native.delta(b, t, torch.empty(30_011, dtype=torch.float64)) is None  # fp64 output: not this kernel
