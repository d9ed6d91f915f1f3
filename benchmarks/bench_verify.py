"""Time `shadowgraft verify` (quick, full, --hash) against reading the same files.

Uses the instruct model of a cached bf16 Llama-shaped trio (built by
``common.build_trio``) at 1x and 4x the layers and runs, each as its own
process from a warm page cache:

- ``read``: every byte of the weight files into one reused buffer (the floor
  for any check that looks at values);
- ``verify --quick``: headers, index, sizes, shadowgraft.json;
- ``verify``: also counts NaN/Inf in every float tensor;
- ``verify --hash``: also sha256 of every file.

Start-up (``import torch``) is the same at both sizes, so the marginal rate
(bytes at 4x - bytes at 1x) / (time at 4x - time at 1x) is the figure to
read. It also times, in process, the cheap check ``apply`` runs on its own
output before the rename.

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


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0.01 else "n/a (noise)"


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
        (b1, m1), (b4, m4) = results[1][name], results[4][name]
        rows.append([name, f"{m1.seconds:.2f}", f"{m4.seconds:.2f}", _rate(b4 - b1, m4.seconds - m1.seconds),
                     f"{m1.cpu_seconds:.2f}", f"{m4.cpu_seconds:.2f}", _rate(b4 - b1, m4.cpu_seconds - m1.cpu_seconds),
                     human(m1.peak_anon), human(m4.peak_anon)])
    sizes = f"{human(results[1]['verify'][0])} / {human(results[4]['verify'][0])}"
    # CPU seconds (user + system) are what to read on a shared machine: wall time includes waiting for a core.
    print_table(f"verify, bf16 model of {sizes} (1x / 4x layers), warm page cache",
                ["tool", "wall s @1x", "wall s @4x", "marginal GB/s", "cpu s @1x", "cpu s @4x", "marginal GB/cpu-s",
                 "anon RSS @1x", "anon RSS @4x"], rows)

    from shadowgraft.verify import verify

    model = build_trio(workdir=Path(args.workdir), shape=TrioShape(args.layers * 4, 1024, 2816, 2048),
                       shard_bytes=24646144).instruct
    verify(model, full=False)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        verify(model, full=False)
        t.append(time.perf_counter() - t0)
    n = len(list(model.glob("*.safetensors")))
    print(f"cheap check apply runs before its rename ({n} shards, in process): {min(t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
