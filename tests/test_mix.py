"""Several deltas onto one instruct (sum, TIES, DARE), against float64 references written here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import shadowgraft
from shadowgraft import ShadowgraftError
from shadowgraft.mix import Mix, dare_keep, kth_largest, name_key
from shadowgraft.synthetic import Shape, llama_tensors, make_trio, randn, write_checkpoint

from .conftest import assert_exact, load

SHAPE = Shape(layers=2, hidden=64, intermediate=96, vocab=128)


def numpy_keep(seed: int, name: str, start: int, n: int, p: float) -> np.ndarray:
    """DARE's documented mask, computed independently with numpy's unsigned integers."""
    k0, k1 = name_key(seed, name)
    m32 = np.uint64(0xFFFFFFFF)

    def mix32(x):
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(0x45D9F3B)) & m32
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(0x45D9F3B)) & m32
        return x ^ (x >> np.uint64(16))

    idx = np.arange(start, start + n, dtype=np.uint64)
    x = mix32((idx & m32) ^ np.uint64(k0))
    x = mix32(x ^ (idx >> np.uint64(32)) ^ np.uint64(k1))
    return x < np.uint64(round(p * 2**32))


def test_dare_mask_is_a_pure_function_of_seed_name_and_index():
    whole = dare_keep(7, "model.layers.0.mlp.up_proj.weight", 0, 100_000, 0.3)
    assert np.array_equal(whole.numpy(), numpy_keep(7, "model.layers.0.mlp.up_proj.weight", 0, 100_000, 0.3))
    # Any chunking gives the same mask.
    parts = torch.cat([dare_keep(7, "model.layers.0.mlp.up_proj.weight", s, min(997, 100_000 - s), 0.3)
                       for s in range(0, 100_000, 997)])
    assert torch.equal(parts, whole)
    # Indices past 2**32 (tensors of more than 4G elements) are hashed too.
    far = 2**32 + 5
    assert np.array_equal(dare_keep(7, "w", far, 1000, 0.5).numpy(), numpy_keep(7, "w", far, 1000, 0.5))
    # The keep rate is p, and another seed or name gives another mask.
    assert abs(float(whole.double().mean()) - 0.3) < 0.01
    assert not torch.equal(whole, dare_keep(8, "model.layers.0.mlp.up_proj.weight", 0, 100_000, 0.3))
    assert not torch.equal(whole, dare_keep(7, "model.layers.1.mlp.up_proj.weight", 0, 100_000, 0.3))


def test_kth_largest_matches_a_sort():
    x = np.random.default_rng(0).standard_normal(10_001).astype(np.float32)
    for density in (1.0, 0.5, 0.2, 1e-6):
        k = math.ceil(density * x.size)
        want = np.sort(np.abs(x))[::-1][k - 1]
        assert kth_largest(np.abs(x), density) == want


def _ties64(ds, w, density):
    """TIES as the issue states it, in float64 on whole tensors."""
    trimmed = []
    for d in ds:
        k = math.ceil(density * d.numel())
        thr = d.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    g = torch.sign(sum(wi * t for wi, t in zip(w, trimmed)))
    num = torch.zeros_like(ds[0])
    den = torch.zeros_like(ds[0])
    for wi, t in zip(w, trimmed):
        agree = (torch.sign(t) == g) & (t != 0)
        num += torch.where(agree, wi * t, torch.zeros_like(t))
        den += agree.double() * wi
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


@pytest.fixture
def skills(tmp_path):
    """One base/instruct pair and three tuned checkpoints of it (three skills)."""
    trio = make_trio(tmp_path / "in", shape=SHAPE, shard_bytes=60_000)
    names = list(llama_tensors(SHAPE))
    tuned = [trio["tuned"]]
    for salt in (3, 4):
        def make(n, sh, salt=salt):
            b = randn(n, sh, 0)
            return b + 0.005 * b.abs().mean() * randn(n, sh, salt, 1.0)
        tuned.append(write_checkpoint(tmp_path / "in" / f"tuned{salt}", names, make, shard_bytes=60_000))
    return trio, tuned


@pytest.mark.parametrize("method", ["sum", "ties"])
def test_combine_matches_float64(tmp_path, skills, method):
    trio, tuned = skills
    w, alpha, density = (0.5, 1.5, 1.0), 0.8, 0.3
    kw = dict(weights=",".join(map(str, w)), density=density) if method == "ties" else dict(weights=list(w))
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=[str(t) for t in tuned],
                            output=tmp_path / "out", alpha=alpha, combine=method, **kw)
    assert res.output == (tmp_path / "out").absolute() and len(res.results) == 1
    inst, base = load(trio["instruct"]), load(trio["base"])
    ts = [load(t) for t in tuned]
    got = load(tmp_path / "out")
    for n in res.plan.grafted:
        ds = [t[n].double() - base[n].double() for t in ts]
        d = sum(wi * di for wi, di in zip(w, ds)) if method == "sum" else _ties64(ds, w, density)
        assert_exact(got[n], inst[n].double() + alpha * d)
    assert set(got) == set(inst) and len(res.plan.grafted) == 2 * 7
    meta = json.loads((tmp_path / "out" / "shadowgraft.json").read_text())
    assert meta["mode"] == "combine" and meta["combine"]["method"] == method and meta["combine"]["weights"] == list(w)
    assert sorted(meta["inputs"]) == ["base", "instruct", "tuned_1", "tuned_2", "tuned_3"]
    assert f"| deltas combined | method {method}; weights 0.5, 1.5, 1.0" in (tmp_path / "out" / "README.md").read_text()


def test_ties_trims_and_votes_away_part_of_the_deltas(tmp_path, skills):
    """At density 0.2 most elements keep instruct's value: the test would fail if trimming did nothing."""
    trio, tuned = skills
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=[str(t) for t in tuned[:2]],
                            output=tmp_path / "out", combine="ties", density=0.2)
    inst, got = load(trio["instruct"]), load(tmp_path / "out")
    n = res.plan.grafted[0]
    same = float((got[n] == inst[n]).double().mean())
    assert 0.5 < same < 0.8  # about (1 - 0.2)^2 of elements untouched by either trimmed delta, plus rounding ties


def test_dare_alone_matches_float64_and_is_deterministic(tmp_path, skills):
    trio, tuned = skills
    p, seed = 0.4, 11
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out",
                            sparsify="dare", density=p, seed=seed)
    inst, base, t = load(trio["instruct"]), load(trio["base"]), load(trio["tuned"])
    got = load(tmp_path / "out")
    for n in res.plan.grafted:
        keep = torch.from_numpy(numpy_keep(seed, f"0\x00{n}", 0, inst[n].numel(), p)).view(inst[n].shape)
        d = torch.where(keep, (t[n].double() - base[n].double()) / p, torch.zeros(inst[n].shape, dtype=torch.float64))
        assert_exact(got[n], inst[n].double() + d)
    again = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "again",
                              sparsify="dare", density=p, seed=seed)
    for f in again.output.glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes()
    meta = json.loads((tmp_path / "out" / "shadowgraft.json").read_text())
    assert meta["combine"] == {"method": "sum", "weights": [1.0], "sparsify": "dare", "density": p, "seed": seed}
    assert "--sparsify dare --density 0.4 --seed 11" in meta["command"]


@pytest.mark.parametrize("mix", [Mix("ties", (1.0, 2.0), 0.3), Mix("sum", (1.0, 0.5), dare=0.4, seed=5)])
def test_chunk_size_does_not_change_a_byte(tmp_path, skills, mix):
    from shadowgraft import Checkpoint
    from shadowgraft.engine import Engine
    from shadowgraft.plan import plan_graft

    trio, tuned = skills
    cks = [Checkpoint.open(trio["instruct"]), Checkpoint.open(trio["base"]), *(Checkpoint.open(t) for t in tuned[:2])]
    plan = plan_graft(cks[0], base=cks[1], tuned=cks[2:], mix=mix, alpha=0.7)
    outs = []
    for chunk in (97, 4096, 1 << 20):
        eng = Engine(cks, chunk=chunk)
        outs.append([])
        for k, shard in enumerate(plan.shards):
            path = tmp_path / f"{chunk}-{k}.safetensors"
            eng.write_shard(shard, path)
            outs[-1].append(path.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_dare_then_ties_uses_independent_masks_per_delta(tmp_path, skills):
    trio, tuned = skills
    p = 0.5
    res = shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=[str(t) for t in tuned[:2]],
                            output=tmp_path / "out", combine="ties", sparsify="dare", density=p, seed=3)
    inst, base = load(trio["instruct"]), load(trio["base"])
    ts = [load(t) for t in tuned[:2]]
    got = load(tmp_path / "out")
    for n in res.plan.grafted[:4]:
        ds = []
        for i, t in enumerate(ts):
            keep = torch.from_numpy(numpy_keep(3, f"{i}\x00{n}", 0, inst[n].numel(), p)).view(inst[n].shape)
            ds.append(torch.where(keep, (t[n].double() - base[n].double()) / p, torch.zeros(inst[n].shape, dtype=torch.float64)))
        assert_exact(got[n], inst[n].double() + _ties64(ds, (1.0, 1.0), 1.0))


@pytest.mark.parametrize("kw, msg", [
    (dict(combine="ties"), r"--combine merges several deltas: give two or more --tuned"),
    (dict(weights="1,2"), r"--weights and --density take effect with --combine or --sparsify"),
    (dict(sparsify="dare"), r"--sparsify dare needs --density P"),
    (dict(sparsify="dare", density=1.5), r"--density must be in \(0, 1\], got 1.5"),
])
def test_bad_mix_options_are_refused_before_writing(tmp_path, kw, msg):
    trio = make_trio(tmp_path / "in", shape=SHAPE)
    with pytest.raises(ShadowgraftError, match=msg):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


def test_weights_must_match_the_tuned_count(tmp_path, skills):
    trio, tuned = skills
    with pytest.raises(ShadowgraftError, match=r"--weights has 2 value\(s\) for 3 --tuned"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=[str(t) for t in tuned],
                          output=tmp_path / "o", combine="sum", weights="1,2")
    with pytest.raises(ShadowgraftError, match=r"--combine ties needs positive --weights"):
        shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=[str(t) for t in tuned],
                          output=tmp_path / "o", combine="ties", weights="1,-1,1")
    assert not (tmp_path / "o").exists()


def test_mix_describe_is_what_the_record_holds():
    assert Mix("ties", (1.0, 2.0), 0.3).describe() == {"method": "ties", "weights": [1.0, 2.0], "density": 0.3}
    assert not Mix("ties", (1.0, 2.0), 0.3, dare=0.5).trims


def test_cli_combine_and_grid_in_one_call(tmp_path, skills, capsys):
    from .conftest import run_cli

    trio, tuned = skills
    code, out, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--base", trio["base"],
                             "--tuned", tuned[0], "--tuned", tuned[1], "--combine", "sum", "--weights", "1,0.5",
                             "--alpha", "0.5,1", "-o", tmp_path / "o")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["alpha-0.5", "alpha-1.0"]
    a, b = (load(tmp_path / "o" / f"alpha-{x}") for x in ("0.5", "1.0"))
    inst, base, t0, t1 = load(trio["instruct"]), load(trio["base"]), load(tuned[0]), load(tuned[1])
    n = "model.layers.1.mlp.down_proj.weight"
    d = (t0[n].double() - base[n].double()) + 0.5 * (t1[n].double() - base[n].double())
    assert_exact(a[n], inst[n].double() + 0.5 * d)
    assert_exact(b[n], inst[n].double() + d)
    assert "2 outputs" in out


@pytest.mark.parametrize("args, msg", [(["--weights", "1,x"], "--weights '1,x': give numbers"),
                                       (["--density", "2"], "2.0 is not in (0, 1]")])
def test_cli_bad_mix_values_are_usage_errors(tmp_path, skills, capsys, args, msg):
    from .conftest import run_cli

    trio, tuned = skills
    code, out, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--base", trio["base"], "--tuned", tuned[0],
                             "--tuned", tuned[1], "--combine", "ties", *args, "-o", tmp_path / "o")
    assert code == 2 and msg in " ".join(err.split())
    assert not (tmp_path / "o").exists()


def test_ties_keeps_a_nan_delta_visible():
    from shadowgraft.mix import combine

    ds = [torch.tensor([1.0, float("nan"), -2.0]), torch.tensor([1.0, 1.0, 3.0])]
    buf = lambda: torch.empty(3)  # noqa: E731
    out = combine([d.clone() for d in ds], Mix("ties", (1.0, 1.0)), buf(), buf(), buf(), buf())
    assert out[0] == 1.0 and out[1].isnan() and out[2] == 3.0
