"""Time `diff` (full and low-rank), `apply --delta` and `apply --adapter` next to `apply --base --tuned`.

Builds (once, cached under --workdir) a bf16 Llama-shaped trio, then runs, each
as its own process from a warm page cache:

    apply --base --tuned      the reference graft
    diff                      full delta T - B (F32)
    apply --delta             instruct + delta; checked byte-identical to the reference
    diff --rank R             shadow adapter by truncated SVD
    apply --adapter           instruct + that adapter (a standard PEFT LoRA)

and prints seconds, GB/s of weights read, peak RSS and peak anonymous RSS.

    .venv/bin/python benchmarks/bench_lora_diff.py --size 200MB --rank 16
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (HERE, MB, VENV_BIN, build_trio, human, load_average, machine, measure, parse_size,  # noqa: E402
                    print_table, shape_for_size, warm_cache)

SG = str(VENV_BIN / "shadowgraft")


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="200MB", help="bytes per model (bf16)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=HERE.parent / "bench-out")
    a = ap.parse_args()
    trio = build_trio(workdir=a.workdir, shape=shape_for_size(parse_size(a.size)), shard_bytes=100 * MB)
    out = a.workdir / "lora-diff"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    warm_cache(trio.files("base") + trio.files("instruct") + trio.files("tuned"))
    model = folder_bytes(trio.base)
    steps = [
        ("apply --base --tuned", [SG, "apply", "-q", "--instruct", trio.instruct, "--base", trio.base, "--tuned", trio.tuned,
                                  "-o", out / "full"], 3 * model),
        ("diff (full delta, F32)", [SG, "diff", "-q", trio.base, trio.tuned, "-o", out / "delta"], 2 * model),
        ("apply --delta", [SG, "apply", "-q", "--instruct", trio.instruct, "--delta", out / "delta", "-o", out / "via-delta"], None),
        (f"diff --rank {a.rank}", [SG, "diff", "-q", trio.base, trio.tuned, "-o", out / "lora", "--rank", str(a.rank)], 2 * model),
        (f"apply --adapter (r={a.rank})", [SG, "apply", "-q", "--instruct", trio.instruct, "--adapter", out / "lora",
                                            "-o", out / "via-lora"], None),
    ]
    rows = []
    for label, cmd, read in steps:
        m = measure([str(c) for c in cmd]).check(label)
        if read is None:  # instruct plus whatever the previous step wrote
            read = model + sum(f.stat().st_size for f in Path(cmd[cmd.index("-o") - 1]).glob("*.safetensors"))
        rows.append([label, f"{m.seconds:.2f}", f"{read / m.seconds / 1e9:.2f}", human(m.peak_rss), human(m.peak_anon)])
    same = all((out / "full" / f.name).read_bytes() == f.read_bytes() for f in sorted((out / "via-delta").glob("*.safetensors")))
    print_table(f"{trio.shape.label()}, {human(model)}/model bf16; {machine()}; load {load_average()}",
                ["step", "seconds", "GB/s read", "peak RSS", "peak anon"], rows)
    print(f"apply --delta output byte-identical to apply --base --tuned: {same}")
    print(f"delta folder {human(folder_bytes(out / 'delta'))}, rank-{a.rank} adapter {human(folder_bytes(out / 'lora'))}")


if __name__ == "__main__":
    main()
