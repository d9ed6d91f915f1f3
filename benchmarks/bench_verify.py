"""Time `shadowgraft verify` (quick, full, --hash) against reading the same files.

Uses the instruct model of a cached bf16 Llama-shaped trio (built by
``common.build_trio``) at 1x and 4x the layers and runs, each as its own
process from a warm page cache:

- ``read``: every byte of the weight files into one reused buffer (the floor
  for any check that looks at values);
- ``verify --quick``: headers, index, sizes, shadowgraft.json;
- ``verify``: also counts NaN/Inf in every float tensor;
- ``verify --hash``: also sha256 of every file.

At these sizes start-up (``import torch``) dominates each command, so the
command table shows start-up and that memory does not grow with the model;
a second table times each mode in process (no start-up) on the 4x model,
including the cheap check ``apply`` runs on its own output before the rename.

    .venv/bin/python benchmarks/bench_verify.py
    .venv/bin/python benchmarks/bench_verify.py --layers 2 --repeat 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MB, VENV_BIN, TrioShape, best_of, build_trio, human, load_average, machine, measure,  # noqa: E402
                    print_table, warm_cache)

READ = r"""
import os, sys
from pathlib import Path
buf = bytearray(8 << 20); mv = memoryview(buf)
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    fd = os.open(f, os.O_RDONLY); off = 0
    while n := os.preadv(fd, [mv], off):
        off += n
    os.close(fd)
"""


def tools(model: Path) -> dict[str, list[str]]:
    sg = str(VENV_BIN / "shadowgraft")
    return {
        "read (floor)": [str(VENV_BIN / "python"), "-c", READ, str(model)],
        "verify --quick": [sg, "verify", "--quick", "-q", str(model)],
        "verify": [sg, "verify", "-q", str(model)],
        "verify --hash": [sg, "verify", "--hash", "-q", str(model)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="layers at 1x (default 4: ~95 MB bf16 per model)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool; the fastest is reported")
    ap.add_argument("--workdir", default="bench-out", help="cached trios (default bench-out)")
    args = ap.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    results: dict[int, dict[str, tuple[int, object]]] = {}
    for mult in (1, 4):
        shape = TrioShape(args.layers * mult, 1024, 2816, 2048)
        trio = build_trio(workdir=Path(args.workdir), shape=shape, shard_bytes=24646144)
        files = trio.files("instruct")
        size = sum(f.stat().st_size for f in files)
        warm_cache(files)
        results[mult] = {}
        for name, cmd in tools(trio.instruct).items():
            m = best_of([measure(cmd).check(name) for _ in range(args.repeat)])
            results[mult][name] = (size, m)
    rows = []
    for name in tools(Path(".")):
        (_, m1), (_, m4) = results[1][name], results[4][name]
        rows.append([name, f"{m1.seconds:.2f}", f"{m4.seconds:.2f}", f"{m1.cpu_seconds:.2f}", f"{m4.cpu_seconds:.2f}",
                     human(m1.peak_anon), human(m4.peak_anon)])
    sizes = f"{human(results[1]['verify'][0])} / {human(results[4]['verify'][0])}"
    # At these sizes start-up (import torch) dominates the commands; the in-process table below gives rates.
    print_table(f"shadowgraft verify as a command, bf16 model of {sizes} (1x / 4x layers), warm page cache",
                ["tool", "wall s @1x", "wall s @4x", "cpu s @1x", "cpu s @4x", "anon RSS @1x", "anon RSS @4x"], rows)

    from shadowgraft.verify import verify

    # In process, no start-up: the rate of each mode on the 4x model.
    model = build_trio(workdir=Path(args.workdir), shape=TrioShape(args.layers * 4, 1024, 2816, 2048),
                       shard_bytes=24646144).instruct
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rows = []
    for label, kw in (("quick (apply's check)", dict(full=False)), ("full", dict(full=True)),
                      ("full + hash", dict(full=True, hash_files=True))):
        verify(model, **kw)
        best = float("inf")
        for _ in range(args.repeat + 2):
            t0 = time.perf_counter()
            assert verify(model, **kw).ok
            best = min(best, time.perf_counter() - t0)
        rate = f"{size / best / 1e9:.2f}" if kw["full"] else "- (headers only)"
        rows.append([label, f"{best * 1e3:.1f}", rate])
    n = len(list(model.glob("*.safetensors")))
    print_table(f"verify in process, {human(size)} in {n} shards, warm page cache", ["mode", "ms", "GB/s"], rows)


if __name__ == "__main__":
    main()
