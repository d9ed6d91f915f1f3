"""Time and peak memory of `shadowgraft stats` against reading the inputs and a naive torch script.

Builds a Llama-shaped bf16 pair (base, instruct) at 1x and 4x the layers,
then runs these tools on each, every one as its own process:

- ``stats``: ``shadowgraft stats A B --json FILE --quiet``;
- ``read``: reads every byte of both models' files into one reused buffer
  (the floor: no tool can compare weights it has not read);
- ``read-par``: the same bytes read by one thread per CPU, as many readers
  as ``stats`` has workers (what the page cache gives when every core reads);
- ``naive``: loads each tensor pair with safetensors, upcasts it to fp32 and
  computes the same metrics with whole-tensor torch ops.

Start-up (``import torch`` alone is about a second) is the same at both
sizes, so the marginal rate, (bytes at 4x - bytes at 1x) / (time at 4x -
time at 1x), is the number to compare. It is given for wall time (GB/s)
and as CPU time (user + system) per GB of input, which a busy shared
machine disturbs less. Peak RSS and CPU time come from ``wait4``.

    python benchmarks/bench_stats.py               # ~1 GB per model at 1x
    python benchmarks/bench_stats.py --gb 0.25 --workdir /tmp/b
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

READ = r"""
import os, sys
from pathlib import Path
buf = bytearray(8 << 20); mv = memoryview(buf)
for folder in sys.argv[1:]:
    for f in sorted(Path(folder).glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY); off = 0
        while True:
            n = os.preadv(fd, [mv], off)
            if n == 0:
                break
            off += n
        os.close(fd)
"""

NAIVE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open

def tensor_files(folder):
    idx = Path(folder) / "model.safetensors.index.json"
    if idx.exists():
        return {k: str(Path(folder) / v) for k, v in json.loads(idx.read_text())["weight_map"].items()}
    f = str(Path(folder) / "model.safetensors")
    with safe_open(f, "pt") as h:
        return {k: f for k in h.keys()}

fa, fb = tensor_files(sys.argv[1]), tensor_files(sys.argv[2])
handles = {}
def get(path, name):
    if path not in handles:
        handles[path] = safe_open(path, "pt")
    return handles[path].get_tensor(name)

rows = {}
for name in fa:
    a = get(fa[name], name).float()
    b = get(fb[name], name).float()
    d = a - b
    sa, sb, sd = a.abs().sum(), b.abs().sum(), d.abs().sum()
    na, nb = a.norm(), b.norm()
    rows[name] = {
        "sigma": (sd / (sa + sb)).item(),
        "rel_l2": (d.norm() / na).item(),
        "cosine": (torch.dot(a.flatten(), b.flatten()) / (na * nb)).item(),
        "max_abs": d.abs().max().item(),
        "identical": (a == b).float().mean().item(),
        "nan_a": int(a.isnan().sum()), "inf_a": int(a.isinf().sum()),
        "nan_b": int(b.isnan().sum()), "inf_b": int(b.isinf().sum()),
    }
block = [r["sigma"] for n, r in rows.items() if ".layers." in n]
json.dump({"sigma_mean": sum(block) / len(block), "tensors": rows}, open(sys.argv[3], "w"))
"""

STATS = "from shadowgraft.cli import console; console()"  # what the shadowgraft script runs


def shape_for(gb: float, layers_mult: int):
    """A Llama-like shape whose 1x model is about ``gb`` GB in bf16."""
    from shadowgraft.synthetic import Shape

    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * 512 + 3 * hidden * inter + 2 * hidden)
    outside = 2 * (2 * vocab * hidden + hidden)
    if gb * 1e9 < outside + per_layer:
        # Small runs: shrink the vocabulary so layers still dominate.
        vocab = 4096
        outside = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((gb * 1e9 - outside) / per_layer))
    return Shape(layers=layers * layers_mult, hidden=hidden, intermediate=inter, vocab=vocab, heads=16, kv_heads=4)


def build(root: Path, shape) -> dict[str, Path]:
    """Write base and instruct (instruct = base + 2% noise) unless this exact shape is already there."""
    from shadowgraft.synthetic import llama_tensors, randn, write_checkpoint

    stamp = root / "shape.json"
    want = json.dumps(shape.__dict__, sort_keys=True)
    paths = {"base": root / "base", "instruct": root / "instruct"}
    if stamp.exists() and stamp.read_text() == want:
        return paths
    names = list(llama_tensors(shape))

    def base(n, sh):
        return randn(n, sh, 0)

    def instruct(n, sh):
        return randn(n, sh, 0) + 0.02 * 0.02 * randn(n, sh, 1, 1.0)

    for label, make in (("base", base), ("instruct", instruct)):
        write_checkpoint(paths[label], names, make, shard_bytes=2_000_000_000)
    stamp.write_text(want)
    return paths


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd[:4])} ...")
    return secs, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e9


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of one model at 1x layers (default 1.0)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"), help="where the models go (default bench-out/)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool and size; the fastest counts")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive script")
    ap.add_argument("--build", nargs=2, metavar=("FOLDER", "MULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        # Runs in a child so this process never imports torch: a forked child
        # counts its parent's pages in its own peak RSS.
        build(Path(args.build[0]), shape_for(args.gb, int(args.build[1])))
        return
    py = sys.executable
    # "stats-ts": the same command with the compiled kernel switched off (TorchScript), when it is built.
    # find_spec, not an import: this process must not load torch (see --build).
    built = importlib.util.find_spec("shadowgraft._native") is not None and os.environ.get("SHADOWGRAFT_NATIVE") != "0"
    tools = ["read", "read-par", "stats"] + (["stats-ts"] if built else []) + ([] if args.no_naive else ["naive"])
    results: dict[tuple[str, int], tuple[float, float, float]] = {}
    size: dict[int, int] = {}
    sigma: dict[tuple[str, int], float] = {}
    for mult in (1, 4):
        root = args.workdir / f"stats-{mult}x"
        print(f"building {mult}x under {root} ...", file=sys.stderr, flush=True)
        subprocess.run([py, __file__, "--gb", str(args.gb), "--build", str(root), str(mult)], check=True)
        a, b = str(root / "base"), str(root / "instruct")
        size[mult] = folder_bytes(root / "base") + folder_bytes(root / "instruct")
        cmds = {
            "read": [py, "-c", READ, a, b],
            # The same bytes on one thread per CPU, 64 MB ranges at a time (the apply benchmark's floor-par reads).
            "read-par": [py, str(Path(__file__).with_name("io_floor.py")), "--read",
                         *map(str, sorted(Path(a).glob("*.safetensors")) + sorted(Path(b).glob("*.safetensors"))),
                         "--threads", str(len(os.sched_getaffinity(0)))],
            "stats": [py, "-c", STATS, "stats", a, b, "--json", str(root / "stats.json"), "--quiet"],
            "stats-ts": [py, "-c", STATS, "stats", a, b, "--json", str(root / "stats-ts.json"), "--quiet"],
            "naive": [py, "-c", NAIVE, a, b, str(root / "naive.json")],
        }
        run(cmds["read"])  # warm the page cache so every tool reads from memory
        runs: dict[str, list] = {tool: [] for tool in tools}
        for _ in range(args.repeat):
            # Round robin, so a burst of load from elsewhere hits every tool alike.
            for tool in tools:
                env = {**os.environ, "SHADOWGRAFT_NATIVE": "0"} if tool == "stats-ts" else None
                runs[tool].append(run(cmds[tool], env))
        for tool in tools:
            # Fastest wall time, least CPU time and smallest peak, each over the repeats.
            results[(tool, mult)] = tuple(min(r[k] for r in runs[tool]) for k in range(3))
        for tool in ("stats", "stats-ts"):
            if tool in tools:
                sigma[(tool, mult)] = json.loads((root / f"{tool}.json").read_text())["summary"]["sigma_mean"]
        if "naive" in tools:
            sigma[("naive", mult)] = json.loads((root / "naive.json").read_text())["sigma_mean"]
    d_bytes = size[4] - size[1]
    print(f"\nLlama-shaped bf16 pair: {size[1] / 1e9:.2f} GB (1x) and {size[4] / 1e9:.2f} GB (4x) of input; "
          f"{os.cpu_count()} CPU(s); best of {args.repeat}; marginal = 4x minus 1x")
    print(f"{'tool':<9}{'1x s':>7}{'4x s':>7}{'GB/s':>7}{'vs read':>9}{'CPU 1x':>8}{'CPU 4x':>8}{'CPU s/GB':>10}{'vs read':>9}"
          f"{'RSS 1x':>9}{'RSS 4x':>9}")
    margin: dict[str, tuple[float, float]] = {}
    for tool in tools:
        (t1, c1, m1), (t4, c4, m4) = results[(tool, 1)], results[(tool, 4)]
        margin[tool] = (t4 - t1, c4 - c1)
    for tool in tools:
        (t1, c1, m1), (t4, c4, m4) = results[(tool, 1)], results[(tool, 4)]
        cells = []
        for k in (0, 1):
            dt, floor = margin[tool][k], margin["read"][k]
            # A busy shared machine can make the 4x run look faster than the 1x one.
            # Wall time as throughput (GB/s), CPU time as its cost (CPU seconds per GB), both at the margin.
            rate = f"{d_bytes / dt / 1e9:.2f}" if k == 0 else f"{dt / (d_bytes / 1e9):.3f}"
            cells += [rate, f"{dt / floor:.2f}x"] if dt > 0 and floor > 0 else ["noisy", "-"]
        print(f"{tool:<9}{t1:>7.2f}{t4:>7.2f}{cells[0]:>7}{cells[1]:>9}{c1:>8.2f}{c4:>8.2f}{cells[2]:>10}{cells[3]:>9}"
              f"{m1:>6.2f} GB{m4:>6.2f} GB")
    if "stats-ts" in tools:
        for mult in (1, 4):
            s, n = sigma[("stats", mult)], sigma[("stats-ts", mult)]
            print(f"sigma_mean {mult}x: compiled kernel {s:.10f}, TorchScript {n:.10f} (rel. diff {abs(s - n) / abs(n):.1e})")
    if "naive" in tools:
        for k, what in ((0, "wall"), (1, "CPU")):
            if margin["stats"][k] > 0:
                print(f"stats vs naive ({what} time): {margin['naive'][k] / margin['stats'][k]:.2f}x faster at the margin, "
                      f"{results[('naive', 4)][k] / results[('stats', 4)][k]:.2f}x end to end at 4x")
        for mult in (1, 4):
            s, n = sigma[("stats", mult)], sigma[("naive", mult)]
            print(f"sigma_mean {mult}x: stats {s:.8f}, naive {n:.8f} (rel. diff {abs(s - n) / abs(n):.1e})")


if __name__ == "__main__":
    main()
