"""The benchmark instruments measure what they claim (no timings asserted here)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import MB, TrioShape, build_trio, measure, parse_size, shape_for_size  # noqa: E402
from agreement import ulp_of, verify_outputs  # noqa: E402

import shadowgraft  # noqa: E402


def test_peak_anon_counts_allocations():
    # 150 MB written (so resident), held long enough for the 5 ms sampler.
    m = measure([sys.executable, "-c", "import time; b = b'x' * 150_000_000; time.sleep(0.3)"]).check("child")
    assert 150 * MB <= m.peak_anon < 190 * MB
    assert 150 * MB <= m.peak_rss < 200 * MB


def test_peak_anon_leaves_out_file_pages(tmp_path):
    f = tmp_path / "big.bin"
    f.write_bytes(b"\1" * (120 * MB))
    code = ("import hashlib, mmap, time; fh = open(%r, 'rb'); mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ); "
            "hashlib.sha1(mm).digest(); time.sleep(0.3)" % str(f))
    m = measure([sys.executable, "-c", code]).check("child")
    assert m.peak_rss >= 120 * MB  # mapped pages are resident ...
    assert m.peak_anon < 40 * MB  # ... but they are page cache, not anonymous memory


def test_peak_rss_is_the_childs_not_the_parents():
    # exec() copies the spawner's peak into the child's ru_maxrss; this process
    # has torch loaded, so a naive reading would report far more than the child uses.
    m = measure([sys.executable, "-c", "import time; time.sleep(0.3)"]).check("child")
    assert 1 * MB < m.peak_rss < 40 * MB


def test_measure_reports_failures():
    m = measure("echo oops >&2; exit 3")
    assert m.returncode == 3
    with pytest.raises(RuntimeError, match="oops"):
        m.check("shell")


def test_shape_for_size_hits_the_size_and_the_largest_tensor_is_a_block_matrix():
    assert parse_size("400MB") == 400 * MB and parse_size("1.5GB") == 1_500_000_000
    for size in (30, 100, 400, 1000):
        s = shape_for_size(size * MB)
        assert s.layers >= 4
        assert abs(s.nbytes() - size * MB) < 0.25 * size * MB
        largest = max(s.tensors(), key=lambda t: t[1][0] * (t[1][1] if len(t[1]) > 1 else 1))
        assert ".mlp." in largest[0]


def test_ulp_of_matches_bf16_spacing():
    import torch

    x = torch.tensor([1.0, 0.75, -3.0, 1e-3], dtype=torch.float64)
    b = x.to(torch.bfloat16)
    nxt = (b.view(torch.int16) + 1).view(torch.bfloat16)
    assert torch.equal(ulp_of(x), (nxt.double() - b.double()).abs())


@pytest.mark.parametrize("threads", [1, 3])
def test_io_floor_copies_instruct_byte_for_byte(tmp_path, threads):
    trio = build_trio(workdir=tmp_path, shape=TrioShape(2, 64, 192, 128), shard_bytes=60_000)
    out = tmp_path / "floor"
    subprocess.run([sys.executable, str(BENCH / "io_floor.py"), "--read", *map(str, trio.files("base")),
                    "--copy", *map(str, trio.files("instruct")), "--to", str(out), "--threads", str(threads)], check=True)
    assert len(trio.files("instruct")) > 1
    for f in trio.files("instruct"):
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_io_floor_threads_copy_every_range(tmp_path, monkeypatch):
    # Ranges far smaller than the files: many per file, taken by three threads in any order.
    import io_floor

    trio = build_trio(workdir=tmp_path, shape=TrioShape(2, 64, 192, 128), shard_bytes=60_000)
    monkeypatch.setattr(io_floor, "RANGE", 4099)
    out = tmp_path / "floor"
    out.mkdir()
    io_floor.parallel(trio.files("base"), trio.files("instruct"), out, 3)
    for f in trio.files("instruct"):
        assert f.stat().st_size > 3 * 4099 and (out / f.name).read_bytes() == f.read_bytes()


def test_verify_accepts_the_graft_and_the_paper_script_and_rejects_an_ungrafted_copy(tmp_path, monkeypatch):
    import paper_script

    trio = build_trio(workdir=tmp_path, shape=TrioShape(2, 64, 192, 128), shard_bytes=60_000)
    good = tmp_path / "good"
    shadowgraft.apply(instruct=trio.instruct, base=trio.base, tuned=trio.tuned, output=good)
    paper = tmp_path / "paper"
    monkeypatch.setattr(sys, "argv", ["paper_script.py", "--instruct", str(trio.instruct), "--base", str(trio.base),
                                      "--tuned", str(trio.tuned), "--output", str(paper)])
    paper_script.main()
    bad = tmp_path / "bad"
    subprocess.run([sys.executable, str(BENCH / "io_floor.py"), "--copy", *map(str, trio.files("instruct")),
                    "--to", str(bad)], check=True)
    assert verify_outputs(trio, {"shadowgraft": good, "paper script": paper})
    assert not verify_outputs(trio, {"shadowgraft ungrafted": bad, "paper script": paper})


def test_scale_shape_is_qwen3_4b_and_smaller_sizes_keep_the_layout():
    from bench_scale import QwenShape, shape_for_gb

    q = shape_for_gb(8.05)
    assert q == QwenShape() and q.layers == 36
    assert 8.0e9 < q.nbytes() < 8.1e9  # Qwen3-4B: 4.02 B parameters in bf16
    assert q.nbytes() == 2 * sum(math.prod(s) for _, s in q.tensors())
    names = dict(q.tensors())
    assert "lm_head.weight" not in names  # tied, as Qwen3-4B
    assert names["model.layers.0.self_attn.k_norm.weight"] == (128,)
    assert names["model.layers.35.mlp.down_proj.weight"] == (2560, 9728)
    for gb in (0.003, 0.05, 0.4, 2.0):
        s = shape_for_gb(gb)
        assert s.layers >= 2
        assert abs(s.nbytes() - gb * 1e9) < 0.35 * gb * 1e9


def test_bench_scale_smoke_run(tmp_path):
    work = tmp_path / "w"
    md = tmp_path / "scale.md"
    r = subprocess.run([sys.executable, str(BENCH / "bench_scale.py"), "--gb", "0.004", "--tools", "floor,cpu",
                        "--no-drop", "--delete", "--workdir", str(work), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    text = md.read_text()
    assert "| I/O floor (read B,T + copy_file_range I) |" in text
    assert "| shadowgraft apply (cpu) |" in text and "| PASS |" in text
    assert "page cache NOT dropped" in text  # --no-drop says so in the title
    assert not list((work / "trios").iterdir())  # --delete removed the trio
    assert not (work / "scale-out").exists()


def test_bench_scale_refuses_a_trio_the_disk_cannot_hold(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "bench_scale.py"), "--gb", "1e9", "--tools", "floor",
                        "--no-drop", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "free, the trio and two outputs need" in r.stderr and "smaller --gb" in r.stderr
    assert not (tmp_path / "trios").exists()
