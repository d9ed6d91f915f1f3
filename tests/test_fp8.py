"""FP8 block-quantized checkpoints (DeepSeek-V3 layout): reading, stats, grafting, requantizing, refusals.

The checkpoints are quantized here by an independent numpy reference: the
e4m3 values come from decoding all 256 bit patterns, rounding is a nearest
search in that table with ties to the even code, and every value is
checked in float64.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import shadowgraft
from shadowgraft import ShadowgraftError, fp8
from shadowgraft.checkpoint import Checkpoint
from shadowgraft.stream import Reader
from shadowgraft.verify import verify

from .conftest import assert_exact, load

QCONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


# -- the independent reference ---------------------------------------------------


def _table() -> np.ndarray:
    """float64 value of every float8_e4m3fn bit pattern (NaN for 0x7F / 0xFF)."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    v = np.where(c >> 7, -v, v)
    v[(e == 15) & (m == 7)] = np.nan
    return v


TABLE = _table()
POSITIVE = TABLE[:127]  # codes 0x00..0x7E: 0 up to 448, increasing


def e4m3_codes(x: np.ndarray) -> np.ndarray:
    """Round float64 ``x`` to e4m3 codes: nearest value, ties to the even code, saturating at 448."""
    a = np.minimum(np.abs(x), 448.0)
    hi = np.minimum(np.searchsorted(POSITIVE, a), 126)
    lo = np.maximum(hi - 1, 0)
    dlo, dhi = a - POSITIVE[lo], POSITIVE[hi] - a
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (pick | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def ref_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and F32 scales: per 128x128 block, scale = f32(amax / 448) (1 for an all-zero block)."""
    rows, cols = w.shape
    R, C = -(-rows // 128), -(-cols // 128)
    codes, scales = np.empty(w.shape, np.uint8), np.empty((R, C), np.float32)
    for i in range(R):
        for j in range(C):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = np.float32(np.abs(blk).max() / 448.0)
            s = np.float32(1) if s == 0 else s
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = e4m3_codes(blk / np.float64(s))
            scales[i, j] = s
    return codes, scales


def ref_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    rows, cols = codes.shape
    s = np.repeat(np.repeat(scales.astype(np.float64), 128, 0), 128, 1)[:rows, :cols]
    return TABLE[codes] * s


def fp8_tensors(w: np.ndarray, name: str) -> dict[str, torch.Tensor]:
    codes, scales = ref_quantize(w)
    return {name: torch.from_numpy(codes).view(torch.float8_e4m3fn), name + "_scale_inv": torch.from_numpy(scales)}


def codes_of(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


def deq(tensors: dict, name: str) -> np.ndarray:
    """float64 value of a weight as loaded: dequantized when FP8, upcast otherwise."""
    t = tensors[name]
    if t.dtype == torch.float8_e4m3fn:
        return ref_dequantize(codes_of(t), tensors[name + "_scale_inv"].numpy())
    return t.double().numpy()


# -- a tiny DeepSeek-shaped trio -------------------------------------------------

# FP8 matrices, deliberately not all multiples of 128; (0, 0) of down_proj is an all-zero block.
FP8_SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (200, 300),
    "model.layers.0.mlp.down_proj.weight": (256, 128),
    "model.layers.1.mlp.up_proj.weight": (130, 129),
    "model.layers.1.self_attn.q_proj.weight": (200, 300),
}
PLAIN_SHAPES = {
    "model.layers.0.self_attn.q_proj.bias": (200,),
    "model.layers.0.input_layernorm.weight": (300,),
    "model.embed_tokens.weight": (64, 300),
    "lm_head.weight": (64, 300),
}
ZERO_BLOCK = "model.layers.0.mlp.down_proj.weight"
# Shard 2 also holds q_proj's scale, away from its weight in shard 1.
SHARD2 = ("model.layers.1.", "lm_head.", "model.layers.0.self_attn.q_proj.weight_scale_inv")


def _weights(seed: int, shapes: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {n: rng.normal(0, 0.02, s) for n, s in shapes.items()}
    out[ZERO_BLOCK][:128, :128] = 0
    return out


def _bf16(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).to(torch.bfloat16)


def write(folder: Path, tensors: dict[str, torch.Tensor], *, quantized: bool, sharded: bool = False) -> Path:
    folder.mkdir(parents=True)
    if sharded:
        two = {n: t for n, t in tensors.items() if n.startswith(SHARD2)}
        files = {"model-00001-of-00002.safetensors": {n: t for n, t in tensors.items() if n not in two},
                 "model-00002-of-00002.safetensors": two}
        for f, part in files.items():
            save_file(part, folder / f)
        index = {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, folder / "model.safetensors")
    cfg = {"model_type": "deepseek_v3", "hidden_size": 300, "torch_dtype": "bfloat16"}
    if quantized:
        cfg["quantization_config"] = QCONFIG
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return folder


def fp8_model(w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for n, x in w.items():
        out.update(fp8_tensors(x, n) if n in FP8_SHAPES else {n: _bf16(x)})
    return out


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """base and instruct FP8 (instruct in two shards), tuned bf16 = dequantized base + noise, tuned8 FP8."""
    root = tmp_path_factory.mktemp("fp8")
    shapes = {**FP8_SHAPES, **PLAIN_SHAPES}
    w = _weights(0, shapes)
    noise = _weights(1, shapes)
    base = fp8_model(w)
    instruct = fp8_model({n: w[n] + 0.1 * noise[n] for n in w})
    tuned_w = {n: deq(base, n) + 0.05 * x for n, x in _weights(2, shapes).items()}
    tuned_w[ZERO_BLOCK][:128, :128] = 0
    return {
        "base": write(root / "base", base, quantized=True),
        "instruct": write(root / "instruct", instruct, quantized=True, sharded=True),
        "tuned": write(root / "tuned", {n: _bf16(x) for n, x in tuned_w.items()}, quantized=False),
        "tuned8": write(root / "tuned8", fp8_model(tuned_w), quantized=True),
    }


def reference(trio, alpha: float = 1.0, tuned: str = "tuned") -> dict[str, np.ndarray]:
    """deq(I) + alpha * (T - deq(B)) in float64, for every tensor of instruct that is not a scale."""
    i, b, t = load(trio["instruct"]), load(trio["base"]), load(trio[tuned])
    return {n: deq(i, n) + alpha * (deq(t, n) - deq(b, n)) for n in i if not n.endswith("_scale_inv")}


# -- reading ------------------------------------------------------------------------


def test_round_e4m3_matches_the_table():
    mids = (POSITIVE[1:] + POSITIVE[:-1]) / 2  # every tie between neighbours
    rng = np.random.default_rng(5)
    x = np.concatenate([POSITIVE, mids, np.nextafter(mids, 0), np.nextafter(mids, 1), rng.uniform(0, 460, 4000),
                        rng.uniform(0, 2.0 ** -6, 2000), [464.0, 500.0, 1e6, 2.0 ** -10, 2.0 ** -11, 0.0]])
    x = np.concatenate([x, -x])
    got = fp8.round_e4m3_(torch.from_numpy(x.copy())).to(torch.float8_e4m3fn)
    assert np.array_equal(codes_of(got), e4m3_codes(x))


def test_header_and_reader_dequantize_any_whole_rows(trio):
    with Checkpoint.open(trio["instruct"]) as ck:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert ck[name].dtype == "F8_E4M3"
        scales = fp8.scales(ck)
        assert set(scales) == set(FP8_SHAPES) and scales[name].shape == (2, 3)
        want = deq(load(trio["instruct"]), name).reshape(-1)
        r = Reader([ck])
        for r0, nrows in [(0, 128), (128, 72), (100, 60), (0, 200), (7, 1)]:
            s, n = r0 * 300, nrows * 300
            got64 = r.load_value("x", ck[name], s, n, torch.float64, scales[name]).numpy()
            assert np.array_equal(got64, want[s:s + n])
            got32 = r.load_value("y", ck[name], s, n, torch.float32, scales[name]).numpy()
            assert np.array_equal(got32, want[s:s + n].astype(np.float32))  # the exact product rounded once


def test_quantize_band_matches_reference():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.02, (200, 300))
    w[128:, 256:] = 0  # a partial all-zero block
    w[:128, 128:256] *= 1e-6  # small values, some round to (signed) zero
    codes, scales = ref_quantize(w)
    x = torch.from_numpy(w.copy()).view(-1)
    out = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
    got_s = torch.empty(2, 3, dtype=torch.float32)
    for band in range(2):
        s, e = band * 128 * 300, min((band + 1) * 128, 200) * 300
        fp8.quantize_band_(x[s:e], 300, out[s:e], got_s[band], torch.empty(e - s, dtype=torch.float64))
    assert np.array_equal(codes_of(out).reshape(200, 300), codes)
    assert np.array_equal(got_s.numpy(), scales) and got_s[1, 2] == 1.0
    assert torch.equal(x, torch.from_numpy(w).view(-1))  # the input is left alone


# -- stats ----------------------------------------------------------------------------


def test_stats_compares_dequantized_values(trio):
    rep = shadowgraft.stats(trio["base"], trio["instruct"])
    a, b = load(trio["base"]), load(trio["instruct"])
    rows = {r.name: r for r in rep.tensors}
    assert set(rows) == {n for n in a if not n.endswith("_scale_inv")}
    for n in FP8_SHAPES:
        x, y = deq(a, n), deq(b, n)
        sigma = np.abs(x - y).sum() / (np.abs(x).sum() + np.abs(y).sum())
        assert math.isclose(rows[n].sigma, sigma, rel_tol=1e-6), n
        assert rows[n].dtype == "F8_E4M3"
    assert rep.fp8_scales == sorted(n + "_scale_inv" for n in FP8_SHAPES)
    assert rep.to_dict()["fp8_scales"] == rep.fp8_scales and not rep.skipped
    block = [r.sigma for r in rep.tensors if r.layer is not None]
    assert math.isclose(rep.summary.sigma_mean, sum(block) / len(block), rel_tol=1e-12)


def test_stats_fp8_against_bf16_and_tuned(trio):
    rep = shadowgraft.stats(trio["base"], trio["tuned"], tuned=trio["tuned8"])
    n = "model.layers.1.mlp.up_proj.weight"
    a, b, t = (load(trio[k]) for k in ("base", "tuned", "tuned8"))
    row = next(r for r in rep.tensors if r.name == n)
    x, y, z = deq(a, n), deq(b, n), deq(t, n)
    assert math.isclose(row.sigma, np.abs(x - y).sum() / (np.abs(x).sum() + np.abs(y).sum()), rel_tol=1e-6)
    dt, db = z - x, y - x
    assert math.isclose(row.delta.cosine, (dt * db).sum() / np.sqrt((dt * dt).sum() * (db * db).sum()), rel_tol=1e-5)
    assert {m.name for m in rep.mismatched} == set(FP8_SHAPES)  # F8_E4M3 vs BF16, compared in full


# -- apply ------------------------------------------------------------------------------


@pytest.mark.parametrize("tuned", ["tuned", "tuned8"])
def test_apply_bfloat16_dequantizes_everything(trio, tmp_path, tuned):
    out = tmp_path / "out"
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio[tuned], output=out,
                            dtype="bfloat16", exclude=[r"layers\.1\.self_attn"])
    ref = reference(trio, tuned=tuned)
    got = load(out)
    assert set(got) == set(ref)  # no scale tensors
    grafted = set(res.plan.grafted)
    assert grafted == set(FP8_SHAPES) - {"model.layers.1.self_attn.q_proj.weight"} | {"model.layers.0.self_attn.q_proj.bias"}
    inst = load(trio["instruct"])
    for n, y in got.items():
        assert y.dtype == torch.bfloat16, n
        if n in grafted:
            assert_exact(y, torch.from_numpy(ref[n]))
        else:  # dequantized (exactly) and rounded once
            assert torch.equal(y, torch.from_numpy(deq(inst, n)).to(torch.bfloat16)), n
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg == {"model_type": "deepseek_v3", "hidden_size": 300, "torch_dtype": "bfloat16"}
    assert (out / "tokenizer_config.json").read_bytes() == (trio["instruct"] / "tokenizer_config.json").read_bytes()
    assert verify(out).ok


@pytest.mark.parametrize("tuned", ["tuned", "tuned8"])
def test_apply_auto_requantizes_grafted_weights(trio, tmp_path, tuned):
    out = tmp_path / "out"
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio[tuned], output=out,
                            exclude=[r"layers\.1\.self_attn"])
    ref = reference(trio, tuned=tuned)
    got, inst = load(out), load(trio["instruct"])
    assert set(got) == set(inst)
    untouched = "model.layers.1.self_attn.q_proj.weight"
    for n in FP8_SHAPES:
        if n == untouched:
            continue
        codes, scales = ref_quantize(ref[n])
        assert got[n].dtype == torch.float8_e4m3fn
        assert np.array_equal(codes_of(got[n]), codes), n
        assert np.array_equal(got[n + "_scale_inv"].numpy(), scales), n
        assert n in res.plan.grafted and n + "_scale_inv" in res.plan.grafted
    assert got[ZERO_BLOCK + "_scale_inv"][0, 0] == 1.0 and not codes_of(got[ZERO_BLOCK])[:128, :128].any()
    for n in (untouched, untouched + "_scale_inv"):
        assert codes_of(got[n].contiguous()).tobytes() == codes_of(inst[n].contiguous()).tobytes()
    assert_exact(got["model.layers.0.self_attn.q_proj.bias"], torch.from_numpy(ref["model.layers.0.self_attn.q_proj.bias"]))
    # Every scale lands in its weight's file, even where instruct kept them apart.
    wmap = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(wmap[n] == wmap[n + "_scale_inv"] for n in FP8_SHAPES)
    assert (out / "config.json").read_bytes() == (trio["instruct"] / "config.json").read_bytes()
    assert verify(out).ok


def test_apply_auto_alpha_grid_packed_shards(trio, tmp_path):
    out = tmp_path / "grid"
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=out, alpha=[0.5, 1.0],
                      max_shard_size="60KB")
    for alpha in (0.5, 1.0):
        folder = out / f"alpha-{alpha!r}"
        ref, got = reference(trio, alpha), load(folder)
        for n in FP8_SHAPES:
            codes, scales = ref_quantize(ref[n])
            assert np.array_equal(codes_of(got[n]), codes) and np.array_equal(got[n + "_scale_inv"].numpy(), scales)
        wmap = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(wmap.values())) > 1 and all(wmap[n] == wmap[n + "_scale_inv"] for n in FP8_SHAPES)


def test_fp8_base_onto_bf16_instruct(trio, tmp_path):
    """The common case: a bf16 instruct, base published in FP8."""
    b = load(trio["base"])
    inst = tmp_path / "instruct16"
    ins_w = {n: deq(b, n) + 0.01 * x for n, x in _weights(7, {**FP8_SHAPES, **PLAIN_SHAPES}).items()}
    write(inst, {n: _bf16(x) for n, x in ins_w.items()}, quantized=False)
    res = shadowgraft.apply(instruct=inst, base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out")
    got, i16, t = load(tmp_path / "out"), load(inst), load(trio["tuned"])
    assert set(got) == set(i16) and not res.plan.warnings  # base's scales are used, not reported as extra
    for n in res.plan.grafted:
        assert got[n].dtype == torch.bfloat16
        assert_exact(got[n], torch.from_numpy(deq(i16, n) + deq(t, n) - deq(b, n)))


def test_ties_combine_reads_fp8_dequantized(trio, tmp_path):
    """TIES over FP8 inputs gives exactly what it gives over the same values stored dequantized in F64."""
    plain = {}
    for k in ("instruct", "base", "tuned", "tuned8"):
        t = load(trio[k])
        plain[k] = write(tmp_path / k, {n: torch.from_numpy(deq(t, n)) for n in t if not n.endswith("_scale_inv")},
                         quantized=False)
    kw = dict(combine="ties", density=0.5, dtype="float32")
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=[trio["tuned"], trio["tuned8"]],
                      output=tmp_path / "a", **kw)
    shadowgraft.apply(instruct=plain["instruct"], base=plain["base"], tuned=[plain["tuned"], plain["tuned8"]],
                      output=tmp_path / "b", **kw)
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_adapter_onto_fp8_instruct(trio, tmp_path, dtype):
    from .test_lora import random_factors, write_adapter

    modules = {n[: -len(".weight")]: FP8_SHAPES[n] for n in FP8_SHAPES}
    factors = random_factors(modules, 4, seed=1)
    ad = write_adapter(tmp_path / "ad", factors, r=4, lora_alpha=8)  # scale 2
    shadowgraft.apply(instruct=trio["instruct"], adapter=ad, output=tmp_path / "out", dtype=dtype)
    got, inst = load(tmp_path / "out"), load(trio["instruct"])
    for m, (a, b) in factors.items():
        ref = deq(inst, m + ".weight") + 2.0 * (b.double() @ a.double()).numpy()
        if dtype == "auto":
            codes, scales = ref_quantize(ref)
            assert np.array_equal(codes_of(got[m + ".weight"]), codes) and np.array_equal(got[m + ".weight_scale_inv"].numpy(), scales)
        else:
            assert_exact(got[m + ".weight"], torch.from_numpy(ref))
    assert ("quantization_config" in json.loads((tmp_path / "out" / "config.json").read_text())) == (dtype == "auto")


def test_dry_run_and_cli(trio, tmp_path):
    run = [sys.executable, "-m", "shadowgraft"]
    p = subprocess.run(run + ["apply", "--instruct", str(trio["instruct"]), "--base", str(trio["base"]), "--tuned",
                              str(trio["tuned"]), "--output", str(tmp_path / "o"), "--dry-run"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "F8_E4M3" in p.stdout and not (tmp_path / "o").exists()
    p = subprocess.run(run + ["stats", str(trio["base"]), str(trio["instruct"]), "--json", "-"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)["fp8_scales"]) == len(FP8_SHAPES)


# -- refusals ---------------------------------------------------------------------------


def _plain(extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    t = {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8, dtype=torch.bfloat16)}
    return {**t, **(extra or {})}


REFUSED = {
    "F8_E5M2": (None, {"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 8, dtype=torch.float8_e5m2)}),
    "GPTQ": ({"quant_method": "gptq", "bits": 4}, {}),
    "AWQ": ({"quant_method": "awq", "bits": 4}, {}),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, {}),
    "MXFP4": ({"quant_method": "mxfp4"}, {}),
    "weight_block_size [64, 64]": ({**QCONFIG, "weight_block_size": [64, 64]}, {}),
    "GPTQ/AWQ (qweight/qzeros/scales)": (None, {"model.layers.0.mlp.down_proj.qweight": torch.zeros(2, 8, dtype=torch.int32),
                                                "model.layers.0.mlp.down_proj.qzeros": torch.zeros(1, 1, dtype=torch.int32),
                                                "model.layers.0.mlp.down_proj.scales": torch.zeros(1, 8)}),
    "bitsandbytes (absmax/quant_state)": (None, {"model.layers.0.mlp.down_proj.weight.absmax": torch.zeros(4)}),
    "MXFP4 (_blocks/_scales)": (None, {"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(2, 8, dtype=torch.uint8),
                                       "model.layers.0.mlp.experts.down_proj_scales": torch.zeros(2, 1, dtype=torch.uint8)}),
    "per-tensor FP8": (None, {"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn),
                              "model.layers.0.mlp.down_proj.weight_scale": torch.ones(())}),
}


@pytest.mark.parametrize("fmt", list(REFUSED))
def test_other_quantized_formats_are_refused(tmp_path, trio, fmt):
    qc, extra = REFUSED[fmt]
    folder = tmp_path / "q"
    folder.mkdir()
    save_file(_plain(extra), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "x", **({"quantization_config": qc} if qc else {})}))
    for call in (lambda: shadowgraft.stats(trio["tuned"], folder),
                 lambda: shadowgraft.apply(instruct=folder, base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o")):
        with pytest.raises(ShadowgraftError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(folder) in msg and fmt in msg, msg
    assert not (tmp_path / "o").exists()


def test_refusal_on_the_command_line(tmp_path, trio):
    folder = tmp_path / "gptq"
    folder.mkdir()
    save_file(_plain(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    p = subprocess.run([sys.executable, "-m", "shadowgraft", "stats", str(trio["tuned"]), str(folder)], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and "GPTQ" in lines[0] and "config.json" in lines[0], lines


def test_inconsistent_scales_are_refused(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    t = {"model.layers.0.mlp.down_proj.weight": torch.zeros(200, 300, dtype=torch.float8_e4m3fn),
         "model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(2, 2)}
    save_file(t, folder / "model.safetensors")
    with pytest.raises(ShadowgraftError, match=r"'model.layers.0.mlp.down_proj.weight_scale_inv' is F32\[2, 2\] .* need F32\[2, 3\]"):
        shadowgraft.stats(folder, folder)


# -- what transformers makes of it -------------------------------------------------------


def test_transformers_loads_both_outputs(tmp_path):
    """A tiny DeepseekV3 built by transformers, quantized the DeepSeek way; both outputs load with no missing or
    unexpected keys (on CPU transformers dequantizes FP8 to bf16, which must equal our float64 dequantization rounded once)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=2,
        num_experts_per_tok=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_group=1, topk_group=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    sd = load(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    rng = np.random.default_rng(0)

    def model(noise: float, quantize: bool) -> dict[str, torch.Tensor]:
        out = {}
        for n, t in sd.items():
            x = t.double().numpy() + noise * rng.normal(size=t.shape)
            # DeepSeek's rule: block matrices are FP8; norms, embeddings, lm_head and the router stay bf16.
            if quantize and t.dim() == 2 and ".layers." in n and "norm" not in n and not n.endswith("mlp.gate.weight"):
                out.update(fp8_tensors(x, n))
            else:
                out[n] = _bf16(x)
        return out

    for role, noise, quantize in (("base", 0.0, True), ("instruct", 0.01, True), ("tuned", 0.01, False)):
        (tmp_path / role).mkdir()
        save_file(model(noise, quantize), tmp_path / role / "model.safetensors")
        cfg_role = {**config, "quantization_config": QCONFIG} if quantize else config
        (tmp_path / role / "config.json").write_text(json.dumps(cfg_role, indent=2))
    n = "model.layers.1.mlp.experts.0.down_proj.weight"
    for dtype in ("bfloat16", "auto"):
        out = tmp_path / dtype
        shadowgraft.apply(instruct=tmp_path / "instruct", base=tmp_path / "base", tuned=tmp_path / "tuned", output=out,
                          dtype=dtype)
        m, info = transformers.DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info
        written = load(out)
        assert (written[n].dtype == torch.float8_e4m3fn) == (dtype == "auto")
        dense = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(m.model.layers[0].mlp.down_proj.weight, torch.from_numpy(deq(written, dense)).to(torch.bfloat16))
        assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()
