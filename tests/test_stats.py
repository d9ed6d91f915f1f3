"""``shadowgraft.stats`` end to end, against float64 numbers computed with safetensors + torch."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest
import torch

import shadowgraft
from shadowgraft import ShadowgraftError, native
from shadowgraft.cli import main
from shadowgraft.compare import stats
from shadowgraft.synthetic import Shape, bert_tensors, llama_tensors, make_trio, randn, write_checkpoint

from .conftest import load, run_cli


def sigma64(a: torch.Tensor, b: torch.Tensor) -> float:
    A, B = a.double(), b.double()
    return float((A - B).abs().sum() / (A.abs().sum() + B.abs().sum()))


def official(base: dict, inst: dict) -> list[float]:
    """The Shadow-FT script's numbers: sigma of every tensor under model.layers.N."""
    return [sigma64(base[n], inst[n]) for n in base if n.startswith("model.layers.")]


def test_sigma_mean_is_the_official_number_on_a_sharded_pair(trio):
    assert len(list(trio["base"].glob("*.safetensors"))) > 1
    r = stats(trio["base"], trio["instruct"], chunk=1000)
    base, inst = load(trio["base"]), load(trio["instruct"])
    sig = official(base, inst)
    s = r.summary
    assert s.basis == "block" and s.n_tensors == len(sig) == 3 * 9
    assert s.sigma_mean == pytest.approx(statistics.fmean(sig), rel=1e-6)
    assert s.sigma_median == pytest.approx(statistics.median(sig), rel=1e-6)
    assert (s.sigma_max, s.sigma_min) == (pytest.approx(max(sig), rel=1e-6), pytest.approx(min(sig), rel=1e-6))
    numel = [base[n].numel() for n in base if n.startswith("model.layers.")]
    assert s.sigma_weighted == pytest.approx(sum(x * k for x, k in zip(sig, numel)) / sum(numel), rel=1e-6)
    assert s.n_compared == len(base) and not r.only_in_a and not r.only_in_b and not r.mismatched
    for row in r.tensors:
        a, b = base[row.name].double().flatten(), inst[row.name].double().flatten()
        assert row.sigma == pytest.approx(sigma64(a, b), rel=1e-6)
        assert row.rel_l2 == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-6)
        assert row.cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-7)
        assert row.max_abs == float((a - b).abs().max())
        assert row.identical == float((a == b).double().mean())
    assert s.graftable and s.verdict.startswith("graftable: sigma_mean")


def test_chunking_and_threads_do_not_change_results(trio):
    ref = stats(trio["base"], trio["instruct"], workers=1)
    for chunk, workers in ((777, 1), (777, 3), (1 << 20, 2)):
        r = stats(trio["base"], trio["instruct"], chunk=chunk, workers=workers)
        for x, y in zip(r.tensors, ref.tensors):
            assert x.name == y.name and x.numel == y.numel and x.max_abs == y.max_abs and x.identical == y.identical
            assert x.sigma == pytest.approx(y.sigma, rel=1e-6)
    # Results are added in chunk order, so threads change nothing at all.
    one, three = (stats(trio["base"], trio["instruct"], chunk=777, workers=w) for w in (1, 3))
    assert [t.sums for t in one.tensors] == [t.sums for t in three.tensors]


def test_bert_names_aggregate_per_layer_and_module(tmp_path):
    names = list(bert_tensors(layers=3))
    t = make_trio(tmp_path, names=names, dtype=torch.float32, gap=0.05)
    r = stats(t["base"], t["instruct"])
    base, inst = load(t["base"]), load(t["instruct"])
    assert [g.key for g in r.layers] == [0, 1, 2]
    for g in r.layers:
        mine = [n for n in base if n.startswith(f"encoder.layer.{g.key}.")]
        assert g.n_tensors == len(mine) == 16
        assert g.sigma_mean == pytest.approx(statistics.fmean(sigma64(base[n], inst[n]) for n in mine), rel=1e-6)
        A = torch.cat([base[n].double().flatten() for n in mine])
        B = torch.cat([inst[n].double().flatten() for n in mine])
        assert g.rel_l2 == pytest.approx(float((A - B).norm() / A.norm()), rel=1e-6)
    kinds = {g.key: g for g in r.modules}
    assert {"q", "k", "v", "o", "up", "down", "norm", "embed"} <= set(kinds)
    assert kinds["q"].n_tensors == 6 and kinds["q"].family == "attn"  # 3 layers x (weight, bias)
    assert kinds["down"].family == "mlp"
    # The official number covers block tensors only: embeddings and pooler are out.
    block = [n for n in base if n.startswith("encoder.layer.")]
    assert r.summary.n_tensors == len(block)
    assert r.summary.sigma_mean == pytest.approx(statistics.fmean(sigma64(base[n], inst[n]) for n in block), rel=1e-6)


def _pair_with_structure_changes(root):
    """A: vocab 128, untied, plus an extra tensor. B: vocab 136, tied, a new tensor, one reshaped, one in fp32."""
    sa = Shape(layers=2, vocab=128)
    sb = Shape(layers=2, vocab=136, tie=True)
    na = list(llama_tensors(sa)) + [("model.extra_a.weight", (4, 4))]
    nb = [(n, (8, 8) if n == "model.layers.1.mlp.up_proj.weight" else s) for n, s in llama_tensors(sb)] + [("model.extra_b.weight", (4,))]

    def make(salt):
        # Same values for the shared rows of the embedding, whatever the vocabulary size.
        def f(n, sh):
            full = randn(n, (max(sh[0], 136),) + tuple(sh[1:]), 0) if "embed" in n else randn(n, sh, 0)
            x = full[: sh[0]] if "embed" in n else full
            return x + 0.001 * randn(n, x.shape, salt, 1.0) if salt else x
        return f

    a = write_checkpoint(root / "a", na, make(0), shard_bytes=40_000)
    b = write_checkpoint(root / "b", nb, make(1))
    # One tensor stored as fp32 in B.
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(b / "model.safetensors"))
    tensors["model.layers.0.self_attn.v_proj.weight"] = tensors["model.layers.0.self_attn.v_proj.weight"].float()
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    return a, b


def test_structural_differences_are_reported_and_overlap_compared(tmp_path):
    a, b = _pair_with_structure_changes(tmp_path)
    r = stats(a, b)
    assert r.only_in_a == ["lm_head.weight", "model.extra_a.weight"]
    assert r.only_in_b == ["model.extra_b.weight"]
    mm = {m.name: m for m in r.mismatched}
    assert set(mm) == {"model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.v_proj.weight"}
    emb = mm["model.embed_tokens.weight"]
    assert (emb.shape_a, emb.shape_b, emb.compared) == ((128, 64), (136, 64), "first 128 rows")
    assert mm["model.layers.1.mlp.up_proj.weight"].compared == "none"
    assert (mm["model.layers.0.self_attn.v_proj.weight"].dtype_b, mm["model.layers.0.self_attn.v_proj.weight"].compared) == ("F32", "all")
    rows = {t.name: t for t in r.tensors}
    A, B = load(a), load(b)
    e = rows["model.embed_tokens.weight"]
    assert e.partial and e.shape == (128, 64)
    assert e.sigma == pytest.approx(sigma64(A[e.name], B[e.name][:128]), rel=1e-6)
    v = rows["model.layers.0.self_attn.v_proj.weight"]
    assert v.dtype == "BF16/F32" and v.sigma == pytest.approx(sigma64(A[v.name], B[v.name]), rel=1e-6)
    assert "model.layers.1.mlp.up_proj.weight" not in rows
    common = {n for n in A if n in B and A[n].shape[1:] == B[n].shape[1:] and A[n].dim() == B[n].dim()}
    assert set(rows) == common
    d = json.loads(r.to_json())
    assert d["mismatched"][0].keys() == {"name", "shape_a", "shape_b", "dtype_a", "dtype_b", "compared"}


@pytest.mark.skipif(not native.available(), reason="shadowgraft._native is not built here")
def test_compiled_and_torchscript_kernels_give_the_same_report(trio, tmp_path, monkeypatch):
    # The compiled kernel reads the files itself; with SHADOWGRAFT_NATIVE=0 the TorchScript one sums what the reader loads.
    names = [("model.layers.0.mlp.up_proj.weight", (64, 48)), ("model.layers.1.mlp.up_proj.weight", (64, 48))]

    def bad(n, sh):
        x = randn(n, sh, 1)
        x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        return x

    a = write_checkpoint(tmp_path / "a", names, lambda n, sh: randn(n, sh, 0), dtype=torch.bfloat16)
    b = write_checkpoint(tmp_path / "b", names, bad, dtype=torch.bfloat16)
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SHADOWGRAFT_NATIVE", flag)
        runs.append([stats(trio["base"], trio["instruct"], tuned=trio["tuned"], chunk=5000), stats(a, b, chunk=1000)])
    for fast, slow in zip(*runs):
        for x, y in zip(fast.tensors, slow.tensors):
            exact = ("numel", "n_diff", "max_abs", "nan_a", "inf_a", "nan_b", "inf_b")
            assert [getattr(x.sums, k) for k in exact] == [getattr(y.sums, k) for k in exact]
            for k in ("abs_a", "abs_b", "abs_d", "sq_a", "sq_b", "sq_d"):
                assert getattr(x.sums, k) == pytest.approx(getattr(y.sums, k), rel=1e-6, nan_ok=True)
            if x.delta is not None:
                assert (x.delta.sq_t, x.delta.dot) == (pytest.approx(y.delta.sq_t, rel=1e-6), pytest.approx(y.delta.dot, rel=1e-5))
    assert runs[0][1].tensors[0].sums.nan_b == 1 and runs[0][1].tensors[0].sums.inf_b == 2


def test_three_checkpoint_mode_against_float64(trio):
    r = stats(trio["base"], trio["instruct"], tuned=trio["tuned"], chunk=5000)
    A, B, T = (load(trio[k]) for k in ("base", "instruct", "tuned"))
    for g in r.layers:
        names = [n for n in A if n.startswith(f"model.layers.{g.key}.")]
        dt = torch.cat([(T[n].double() - A[n].double()).flatten() for n in names])
        db = torch.cat([(B[n].double() - A[n].double()).flatten() for n in names])
        assert g.delta_ratio == pytest.approx(float(dt.norm() / db.norm()), rel=1e-6)
        assert g.delta_cosine == pytest.approx(float(dt @ db / (dt.norm() * db.norm())), rel=1e-5)
    names = [n for n in A if n.startswith("model.layers.")]
    dt = torch.cat([(T[n].double() - A[n].double()).flatten() for n in names])
    db = torch.cat([(B[n].double() - A[n].double()).flatten() for n in names])
    assert r.summary.delta_ratio == pytest.approx(float(dt.norm() / db.norm()), rel=1e-6)
    row = r.tensors[3]
    assert row.delta.ratio == pytest.approx(float((T[row.name].double() - A[row.name].double()).norm()
                                                  / (B[row.name].double() - A[row.name].double()).norm()), rel=1e-6)
    d = json.loads(r.to_json())
    assert {"delta_ratio", "delta_cosine"} <= d["summary"].keys() and {"delta_ratio", "delta_cosine"} <= d["layers"][0].keys()


def test_scope_include_exclude(trio):
    r = stats(trio["base"], trio["instruct"], scope="linear")
    assert len(r.tensors) == 3 * 7 and all(t.module in ("q", "k", "v", "o", "gate", "up", "down") for t in r.tensors)
    r = stats(trio["base"], trio["instruct"], include=[r"layers\.1\."], exclude=["norm"])
    assert {t.layer for t in r.tensors} == {1} and len(r.tensors) == 7
    # An include that selects nothing is named on its own; one that the excludes empty again leaves nothing in common.
    with pytest.raises(ShadowgraftError, match=r"^--include 'nothing-matches' matches no floating tensor inside --scope all of "):
        stats(trio["base"], trio["instruct"], include=["nothing-matches"])
    with pytest.raises(ShadowgraftError, match="no floating tensor of the same name in common inside --scope"):
        stats(trio["base"], trio["instruct"], include=["norm"], exclude=["norm"])


def test_nan_inputs_are_flagged_and_json_stays_valid(tmp_path):
    names = [("model.layers.0.mlp.up_proj.weight", (8, 8)), ("model.layers.1.mlp.up_proj.weight", (8, 8))]

    def bad(n, sh):
        x = randn(n, sh, 1)
        if "layers.0" in n:
            x[0, 0] = float("nan")
        return x

    a = write_checkpoint(tmp_path / "a", names, lambda n, sh: randn(n, sh, 0), dtype=torch.float32)
    b = write_checkpoint(tmp_path / "b", names, bad, dtype=torch.float32)
    r = stats(a, b)
    assert r.summary.n_nonfinite == 1 and r.summary.n_tensors == 1
    assert r.summary.sigma_mean == pytest.approx(sigma64(load(a)[names[1][0]], load(b)[names[1][0]]), rel=1e-6)
    d = json.loads(r.to_json())
    t0 = d["tensors"][0]
    assert t0["sigma"] is None and t0["nan_b"] == 1 and t0["nan_a"] == 0
    assert "NaN/Inf left out" in r.summary.verdict
    # rel_l2 and cosine leave the NaN tensor out too: they are the finite tensor's (to fp32 sums' accuracy;
    # a NaN left in would make them NaN, a wrong tensor off by far more).
    A, B = load(a)[names[1][0]].double(), load(b)[names[1][0]].double()
    assert r.summary.rel_l2 == pytest.approx(float((A - B).norm() / A.norm()), rel=1e-5)
    assert r.summary.cosine == pytest.approx(float((A * B).sum() / (A.norm() * B.norm())), rel=1e-5)
    layer0 = next(g for g in r.layers if g.key == 0)
    assert math.isnan(layer0.rel_l2) and math.isnan(layer0.sigma_mean)
    assert "layers 1 (" in r.summary.verdict and "layers 0" not in r.summary.verdict and "nan" not in r.summary.verdict


def test_strict_fails_on_nan_with_one_line(tmp_path, capsys):
    names = [("model.layers.0.mlp.up_proj.weight", (8, 8))]
    a = write_checkpoint(tmp_path / "a", names, lambda n, sh: randn(n, sh, 0), dtype=torch.float32)
    b = write_checkpoint(tmp_path / "b", names, lambda n, sh: randn(n, sh, 1).fill_(float("inf")), dtype=torch.float32)
    main(["stats", str(a), str(b), "--quiet"])
    # --quiet drops the tables, never the NaN/Inf line.
    assert capsys.readouterr().err.strip() == "NaN/Inf values in 1 tensor(s): model.layers.0.mlp.up_proj.weight"
    with pytest.raises(SystemExit) as e:
        main(["stats", str(a), str(b), "--strict", "--quiet"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: 'model.layers.0.mlp.up_proj.weight': NaN/Inf values, 64 in B "
                                              "(1 tensor(s) affected); check the inputs, or drop --strict to report them per tensor")


def test_verdict_over_threshold_names_layers(trio):
    r = stats(trio["base"], trio["instruct"], threshold=0.001)
    assert not r.summary.graftable
    assert r.summary.verdict.startswith("not advisable: sigma_mean")
    assert "most divergent: layers " in r.summary.verdict and "modules " in r.summary.verdict
    with pytest.raises(ShadowgraftError, match="--threshold must be a positive number"):
        stats(trio["base"], trio["instruct"], threshold=0)


def test_cli_json_on_stdout_is_the_only_output(trio, capsys):
    main(["stats", str(trio["base"]), str(trio["instruct"]), "--json", "-"])
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    assert {"summary", "tensors", "layers", "modules", "only_in_a", "only_in_b", "mismatched"} <= d.keys()
    assert {"sigma_mean", "sigma_median", "sigma_max", "sigma_min", "sigma_weighted", "n_tensors"} <= d["summary"].keys()
    assert {"name", "shape", "dtype", "numel", "sigma", "rel_l2", "cosine"} <= d["tensors"][0].keys()
    assert d["summary"]["sigma_mean"] == pytest.approx(statistics.fmean(official(load(trio["base"]), load(trio["instruct"]))), rel=1e-6)
    # The human report went to stderr.
    assert "verdict" in cap.err and "sigma_mean" in cap.err


def test_cli_writes_csv_and_prints_tables(trio, tmp_path, capsys):
    out = tmp_path / "t.csv"
    main(["stats", str(trio["base"]), str(trio["instruct"]), "--csv", str(out), "--by", "module", "--top", "3"])
    text = capsys.readouterr().out
    assert "per module" in text and "top 3 of 30 tensors by sigma" in text and "verdict: graftable" in text
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    base, inst = load(trio["base"]), load(trio["instruct"])
    assert [r["name"] for r in rows] == [n for n in base if n in inst]
    r0 = rows[0]
    assert float(r0["sigma"]) == pytest.approx(sigma64(base[r0["name"]], inst[r0["name"]]), rel=1e-6)


def test_plot_is_written(trio, tmp_path):
    pytest.importorskip("matplotlib")
    r = stats(trio["base"], trio["instruct"], tuned=trio["tuned"])
    png, svg = r.plot(tmp_path / "s.png"), r.plot(tmp_path / "s.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert b"<svg" in svg.read_bytes()[:2000]


def test_plot_refuses_unknown_suffix_before_reading(trio, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stats", str(trio["base"]), str(trio["instruct"]), "--plot", "x.jpg"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "error: x.jpg: a plot file must end in .png, .svg or .pdf"


def test_missing_path_exits_1_with_one_line(trio, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stats", str(trio["base"]), str(tmp_path / "nope")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "nope: no such file or folder" in err


def test_usage_error_exits_2(trio, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stats", str(trio["base"]), str(trio["instruct"]), "--json", "-", "--csv", "-"])
    assert e.value.code == 2


def test_api_reexport_and_report_types(trio):
    r = shadowgraft.stats(trio["base"], trio["instruct"])
    assert isinstance(r.summary.sigma_mean, float) and math.isfinite(r.summary.sigma_mean)
    assert r.to_dict()["summary"]["n_tensors"] == r.summary.n_tensors


def test_verdict_bands_rest_on_published_sigmas():
    from shadowgraft.summary import band_of

    assert band_of(0.016) == "close"  # Llama-3.1-8B base vs instruct
    assert band_of(0.0562) == "graftable"  # Qwen3-4B-Base vs Instruct-2507, a pair the paper grafts
    assert band_of(0.2) == "divergent" and band_of(math.nan) == "unknown"
    assert band_of(0.0562, close=0.06) == "close" and band_of(0.0562, threshold=0.05, close=0.01) == "divergent"


@pytest.mark.parametrize("gap, band, head", [(0.02, "close", "graftable: sigma_mean"),
                                             (0.2, "graftable", "graftable, try an alpha grid: sigma_mean"),
                                             (0.8, "divergent", "not advisable: sigma_mean")])
def test_verdict_band_of_real_pairs(tmp_path, gap, band, head, capsys):
    trio = make_trio(tmp_path, shape=Shape(layers=2, hidden=64, intermediate=96, vocab=128), gap=gap)
    r = stats(trio["base"], trio["instruct"])
    sig = statistics.fmean(official(load(trio["base"]), load(trio["instruct"])))
    assert r.summary.sigma_mean == pytest.approx(sig, rel=1e-6)
    want = "close" if sig < 0.03 else "graftable" if sig < 0.12 else "divergent"
    assert r.summary.band == band == want
    assert r.summary.verdict.startswith(head) and r.summary.graftable == (band != "divergent")
    main(["stats", str(trio["base"]), str(trio["instruct"]), "--json", "-", "--quiet"])
    d = json.loads(capsys.readouterr().out)["summary"]
    assert (d["band"], d["close"], d["threshold"]) == (band, 0.03, 0.12)
    with pytest.raises(ShadowgraftError, match=r"--close must be a positive number no larger than --threshold \(0.12\), got 0.5"):
        stats(trio["base"], trio["instruct"], close=0.5)


def test_tensors_only_one_side_has_are_listed_whatever_their_dtype(tmp_path, capsys):
    # all-MiniLM-style: A carries an int64 position_ids buffer (and a bool mask) that B lacks; B has a float one A lacks.
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w = {f"encoder.layer.{i}.attention.self.query.weight": torch.randn(8, 8, generator=g) for i in range(2)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({**w, "embeddings.position_ids": torch.arange(16).reshape(1, 16),
               "encoder.layer.0.attention.mask": torch.ones(4, 4, dtype=torch.bool)}, str(tmp_path / "a" / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in w.items()} | {"pooler.dense.weight": torch.randn(8, 8, generator=g)},
              str(tmp_path / "b" / "model.safetensors"))
    r = stats(tmp_path / "a", tmp_path / "b")
    assert r.only_in_a == ["embeddings.position_ids", "encoder.layer.0.attention.mask"]
    assert r.only_in_b == ["pooler.dense.weight"]
    d = json.loads(r.to_json())
    assert d["only_in_a"] == r.only_in_a and d["only_in_b"] == r.only_in_b
    rows = list(csv.DictReader(io.StringIO(r.to_csv())))
    assert [(x["name"], x["only_in"]) for x in rows] == [(n, "") for n in w] + [
        ("embeddings.position_ids", "A"), ("encoder.layer.0.attention.mask", "A"), ("pooler.dense.weight", "B")]
    assert rows[-1]["sigma"] == "" and rows[0]["sigma"] != ""
    # Narrowed by --scope like everything else: the mask sits in a block, position_ids does not.
    assert stats(tmp_path / "a", tmp_path / "b", scope="linear").only_in_a == ["encoder.layer.0.attention.mask"]
    code, out, err = run_cli(capsys, "stats", tmp_path / "a", tmp_path / "b", "--top", "0")
    assert code == 0, err
    assert "only in A (2): embeddings.position_ids, encoder.layer.0.attention.mask" in " ".join(out.split())
    assert "only in B (1): pooler.dense.weight" in " ".join(out.split())


def test_close_over_threshold_is_a_usage_error_on_the_command_line(trio, capsys):
    code, out, err = run_cli(capsys, "stats", trio["base"], trio["instruct"], "--close", "0.5", "--threshold", "0.1")
    assert code == 2
    assert "--close must be a positive number no larger than --threshold (0.1), got 0.5" in " ".join(err.split())
