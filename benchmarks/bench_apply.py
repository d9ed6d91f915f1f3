"""Time `shadowgraft apply` against the I/O floor, a whole-model-in-RAM script and mergekit.

Builds (once, cached under --workdir) a bf16 Llama-shaped base/instruct/tuned
trio, runs every tool on it as its own process from a warm page cache, and
prints seconds, input GB/s, peak RSS and peak anonymous RSS. With
``--scaling 1,2,4`` it repeats this at 1x, 2x and 4x the layers and prints the
marginal cost per GB of input, which cancels interpreter start-up and imports,
then checks the performance targets. Afterwards it verifies that the outputs
agree, so the rows time the same computation.

    .venv/bin/python benchmarks/bench_apply.py                      # ~400 MB per model
    .venv/bin/python benchmarks/bench_apply.py --size 100MB --scaling 1,2,4
    .venv/bin/python benchmarks/bench_apply.py --layers 8 --hidden 2048 --intermediate 5632
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (HERE, MB, VENV_BIN, Measurement, Trio, TrioShape, best_of, build_trio, human,  # noqa: E402
                    load_average, machine, measure, parse_size, print_table, shape_for_size, warm_cache)
from agreement import verify_outputs  # noqa: E402

PY = str(VENV_BIN / "python")


@dataclass(frozen=True)
class Tool:
    key: str  # short name for --tools
    label: str
    command: Callable[[Trio, Path], list[str] | str]
    streams: bool = True  # processes the trio (False: a fixed start-up cost)
    env: dict | None = None
    warm: list[str] | None = None  # run once untimed, so the tool's libraries are in the page cache too


def _files(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths]


def shadowgraft_cmd(device: str):
    def cmd(trio: Trio, out: Path):
        return [str(VENV_BIN / "shadowgraft"), "apply", "--instruct", str(trio.instruct), "--base", str(trio.base),
                "--tuned", str(trio.tuned), "--output", str(out), "--device", device, "--quiet"]
    return cmd


def floor_cmd(trio: Trio, out: Path):
    return [PY, str(HERE / "io_floor.py"), "--read", *_files(trio.files("base") + trio.files("tuned")),
            "--copy", *_files(trio.files("instruct")), "--to", str(out)]


def floor_par_cmd(trio: Trio, out: Path):
    return floor_cmd(trio, out) + ["--threads", str(len(os.sched_getaffinity(0)))]


def cat_cp_cmd(trio: Trio, out: Path):
    q = lambda ps: " ".join(shlex.quote(str(p)) for p in ps)  # noqa: E731
    return (f"cat {q(trio.files('base') + trio.files('tuned'))} > /dev/null && mkdir -p {shlex.quote(str(out))} "
            f"&& cp {q(trio.files('instruct'))} {shlex.quote(str(out))}/")


def paper_cmd(trio: Trio, out: Path):
    return [PY, str(HERE / "paper_script.py"), "--instruct", str(trio.instruct), "--base", str(trio.base),
            "--tuned", str(trio.tuned), "--output", str(out)]


MERGEKIT_CONFIG = """\
# W_out = I + 1*(T - I) + (-1)*(B - I) = I + (T - B) on the projections;
# every other tensor gets weight 0 and so stays instruct's, as in the graft.
merge_method: task_arithmetic
base_model: {instruct}
models:
  - model: {tuned}
    parameters:
      weight: [{{filter: _proj, value: 1.0}}, {{value: 0.0}}]
  - model: {base}
    parameters:
      weight: [{{filter: _proj, value: -1.0}}, {{value: 0.0}}]
parameters:
  normalize: false
dtype: bfloat16
"""


def mergekit_cmd(venv: Path):
    def cmd(trio: Trio, out: Path):
        cfg = out.parent / f"mergekit-{trio.root.name}.yml"
        cfg.write_text(MERGEKIT_CONFIG.format(instruct=trio.instruct, tuned=trio.tuned, base=trio.base))
        return [str(venv / "bin" / "mergekit-yaml"), str(cfg), str(out), "--no-copy-tokenizer",
                "--no-write-model-card", "--quiet"]
    return cmd


def pick_tools(args) -> list[Tool]:
    import torch

    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    from shadowgraft import native

    tools = [Tool("cpu", "shadowgraft apply (cpu)", shadowgraft_cmd("cpu"))]
    if native.available():
        # The same engine with the compiled kernels switched off: what they buy, in the same run.
        tools.append(Tool("cpu-ts", "shadowgraft apply (cpu, TorchScript kernels)", shadowgraft_cmd("cpu"),
                          env={**os.environ, "SHADOWGRAFT_NATIVE": "0"}))
    if torch.cuda.is_available():
        tools.append(Tool("cuda", "shadowgraft apply (cuda)", shadowgraft_cmd("cuda")))
    tools += [
        Tool("floor", "I/O floor (read B,T + copy_file_range I)", floor_cmd),
        Tool("floor-par", "I/O floor, one thread per CPU", floor_par_cmd),
        Tool("cat", "I/O floor cross-check (cat B,T; cp I)", cat_cp_cmd),
        Tool("paper", "paper script (3 models in RAM, bf16)", paper_cmd),
    ]
    venv = Path(args.mergekit_venv or Path(args.workdir) / "mergekit-venv")
    if (venv / "bin" / "mergekit-yaml").exists():
        info = sorted(venv.glob("lib/python*/site-packages/mergekit-*.dist-info"))
        version = info[-1].name.removesuffix(".dist-info").split("-", 1)[1] if info else "?"
        tools.append(Tool("mergekit", f"mergekit {version} task_arithmetic (bf16)", mergekit_cmd(venv), env=offline,
                          warm=[str(venv / "bin" / "python"), "-c", "import mergekit.merge, transformers"]))
    elif "mergekit" in (args.tools or "mergekit"):
        print(f"mergekit not found in {venv}: install it with `bash benchmarks/mergekit_venv.sh` "
              "(or `make bench-mergekit`); skipping its row", flush=True)
    tools += [
        Tool("torch", 'python -c "import torch"', lambda t, o: [PY, "-c", "import torch"], streams=False),
        # `import shadowgraft` alone is lazy (no torch); the baseline is what a
        # graft must load: the engine and torch with it.
        Tool("import", 'python -c "import shadowgraft.graft"', lambda t, o: [PY, "-c", "import shadowgraft.graft"], streams=False),
        Tool("package", 'python -c "import shadowgraft"', lambda t, o: [PY, "-c", "import shadowgraft"], streams=False),
    ]
    if args.tools:
        keep = set(args.tools.split(",")) | {"floor", "import"}  # the targets are relative to these two
        tools = [t for t in tools if t.key in keep]
    return tools


def run_all(trios: list[tuple[int, Trio]], tools: list[Tool], args, md: list[str]):
    """Time every tool on every trio ``--repeat`` times; returns ``[(factor, trio, {key: best})]`` and agreement.

    Repeats go round-robin over sizes and tools, so load from other processes
    falls on every row alike instead of on whichever size ran during it.
    Outputs of the last round are checked with ``agreement.py``, then deleted.
    """
    outroot = Path(args.workdir) / "out"
    warm_cache([f for _, tr in trios for w in ("base", "instruct", "tuned") for f in tr.files(w)])
    for cmd in {tuple(t.warm) for t in tools if t.warm} | {(PY, "-c", "import shadowgraft.cli, safetensors.torch")}:
        subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, check=False)
    runs: dict[tuple[int, str], list[Measurement]] = {(f, t.key): [] for f, _ in trios for t in tools}
    agree = True
    for r in range(args.repeat):
        last = r == args.repeat - 1
        for f, trio in trios:
            outs = {}
            for t in tools:
                out = outroot / f"{f}x" / t.key
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                prime = (out.parent, trio.input_bytes() // 3) if t.streams else None
                runs[f, t.key].append(measure(t.command(trio, out), env=t.env, prime=prime).check(t.label))
                outs[t.label] = out
                if not (last and t.key in ("cpu", "cuda", "paper", "mergekit")):
                    shutil.rmtree(out, ignore_errors=True)
            if last:
                agree &= verify_outputs(trio, outs, markdown=md)
                shutil.rmtree(outroot / f"{f}x", ignore_errors=True)
    return [(f, trio, {t.key: best_of(runs[f, t.key]) for t in tools}) for f, trio in trios], agree


def size_table(trio: Trio, res: dict[str, Measurement], tools: list[Tool], args, load: str, where: str,
               md: list[str]) -> None:
    nin = trio.input_bytes()
    rows = []
    for t in tools:
        m = res[t.key]
        gbps = f"{nin / m.seconds / 1e9:.2f}" if t.streams else "—"
        cpu_gb = f"{m.cpu_seconds / (nin / 1e9):.3f}" if t.streams else "—"
        rows.append([t.label, f"{m.seconds:.2f}", f"{m.cpu_seconds:.2f}", cpu_gb, gbps, human(m.peak_rss),
                     human(m.peak_anon)])
    s = trio.shape
    title = (f"apply: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, vocab {s.vocab}; "
             f"{human(nin / 3)}/model, {human(nin)} of input; best of {args.repeat}; warm page cache "
             f"(inputs read once before timing, nothing dropped); {where}; load average {load}")
    print_table(title, ["tool", "seconds", "CPU s", "CPU s/GB of input", "GB/s of input", "peak RSS", "peak anon RSS"],
                rows, markdown=md)


def scaling_report(sizes: list[tuple[int, Trio, dict[str, Measurement]]], tools: list[Tool], md: list[str]) -> dict:
    (f0, t0, r0), (f1, t1, r1) = sizes[0], sizes[-1]
    extra_gb = (t1.input_bytes() - t0.input_bytes()) / 1e9
    marginal = {t.key: (r1[t.key].seconds - r0[t.key].seconds) / extra_gb for t in tools if t.streams}
    cpu = {t.key: (r1[t.key].cpu_seconds - r0[t.key].cpu_seconds) / extra_gb for t in tools if t.streams}
    floor = marginal["floor"]
    cols = ["tool"] + [f"s @{f}x" for f, _, _ in sizes] + [f"peak anon @{f}x" for f, _, _ in sizes]
    cols += [f"peak RSS @{f1}x", "marginal s/GB", "x floor", "marginal CPU s/GB"]
    rows = []
    for t in tools:
        row = [t.label] + [f"{r[t.key].seconds:.2f}" for _, _, r in sizes] + [human(r[t.key].peak_anon) for _, _, r in sizes]
        row.append(human(r1[t.key].peak_rss))
        if t.streams:
            ratio = f"{marginal[t.key] / floor:.2f}" if floor > 0 and marginal[t.key] > 0 else "noise"
            row += [f"{marginal[t.key]:.3f}", ratio, f"{cpu[t.key]:.3f}"]
        else:
            row += ["—"] * 3
        rows.append(row)
    ins = ", ".join(f"{f}x = {human(tr.input_bytes())}" for f, tr, _ in sizes)
    print_table(f"scaling: input {ins}; marginal = (time @{f1}x - time @{f0}x) / extra input GB", cols, rows, markdown=md)
    return marginal


def targets(sizes, tools: list[Tool], marginal: dict | None, md: list[str]) -> None:
    keys = {t.key for t in tools}
    rows = []

    def add(what, got, limit, ok):
        rows.append([what, got, limit, "PASS" if ok else "FAIL"])

    for f, trio, r in sizes:
        cap = 4 * 4 * trio.shape.largest_numel() + 64 * MB
        for dev in ("cpu", "cuda"):
            if dev in keys:
                extra = r[dev].peak_anon - r["import"].peak_anon
                add(f"{dev} @{f}x: peak anon RSS above `import shadowgraft.graft`", human(extra),
                    f"<= {human(cap)} (4 x largest fp32 + 64 MB)", extra <= cap)
    f0, t0, r0 = sizes[0]
    # Start-up does not depend on the trio: take the best of every size's runs.
    fixed = {k: min(r[k].seconds for _, _, r in sizes) for k in ("torch", "import", "package") if k in keys}
    if "cpu" in keys:
        budget = fixed["import"] + r0["floor"].seconds + 0.5
        add(f"cpu @{f0}x: fixed cost", f"{r0['cpu'].seconds:.2f} s", f"<= {budget:.2f} s (import + floor + 0.5)",
            r0["cpu"].seconds <= budget)
    if "torch" in keys and "package" in keys:
        add("import shadowgraft vs import torch", f"{fixed['package']:.2f} s", f"<= {fixed['torch']:.2f} s",
            fixed["package"] <= fixed["torch"])
    if "torch" in keys:
        # The engine imports torch, so it cannot cost less; what it adds is its own modules.
        rows.append(["import shadowgraft.graft minus import torch", f"{fixed['import'] - fixed['torch']:+.2f} s",
                     "(info: the engine's own modules)", "info"])
    if marginal is not None:
        for dev, k in (("cpu", 1.5), ("cuda", 1.2)):
            if dev not in keys:
                continue
            if marginal[dev] <= 0 or marginal["floor"] <= 0:
                # A bigger trio ran faster: load from other processes swamped the difference.
                rows.append([f"{dev}: marginal cost vs floor", "negative", f"<= {k}x", "NOISE"])
            else:
                add(f"{dev}: marginal cost vs floor", f"{marginal[dev] / marginal['floor']:.2f}x", f"<= {k}x",
                    marginal[dev] <= k * marginal["floor"])
    if "cuda" in keys:
        for f, _, r in sizes:
            add(f"cuda @{f}x vs cpu", f"{r['cuda'].seconds:.2f} s", f"<= {r['cpu'].seconds:.2f} s",
                r["cuda"].seconds <= r["cpu"].seconds)
    if rows:
        print_table("targets", ["target", "measured", "limit", "result"], rows, markdown=md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--size", default="400MB", help="bf16 bytes per model; picks a Llama-like shape (default 400MB)")
    ap.add_argument("--layers", type=int, help="exact shape instead of --size: number of layers")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--shard-size", help="bytes per input shard (default: a quarter of the 1x model)")
    ap.add_argument("--scaling", default="1", help="layer multipliers, e.g. 1,2,4")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool; the fastest is reported")
    ap.add_argument("--tools", help="comma list of: cpu,cuda,floor,floor-par,cat,paper,mergekit,torch,import,package (default all)")
    ap.add_argument("--workdir", default="bench-out", help="cached trios and outputs (default bench-out)")
    ap.add_argument("--mergekit-venv", help="venv with mergekit-yaml (default WORKDIR/mergekit-venv)")
    ap.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    args = ap.parse_args()

    shape = (TrioShape(args.layers, args.hidden, args.intermediate, args.vocab) if args.layers
             else shape_for_size(parse_size(args.size)))
    shard = parse_size(args.shard_size) if args.shard_size else -(-shape.nbytes() // 4)
    factors = [int(x) for x in args.scaling.split(",")]
    if factors[0] < 1 or any(b <= a for a, b in zip(factors, factors[1:])):
        ap.error(f"--scaling needs increasing positive multipliers, got {args.scaling}")
    tools = pick_tools(args)
    md: list[str] = []
    trios = [(f, build_trio(workdir=Path(args.workdir), shape=shape.scaled(f), shard_bytes=shard)) for f in factors]
    load, where = load_average(), machine()  # the free memory before the runs
    sizes, agree = run_all(trios, tools, args, md)
    load = f"{load} before, {load_average()} after"
    for _, trio, res in sizes:
        size_table(trio, res, tools, args, load, where, md)
    marginal = scaling_report(sizes, tools, md) if len(sizes) > 1 else None
    targets(sizes, tools, marginal, md)
    shutil.rmtree(Path(args.workdir) / "out", ignore_errors=True)
    if args.markdown:
        args.markdown.write_text("\n".join(md) + "\n")
    if not agree:
        sys.exit("shadowgraft's output disagrees with the reference (see the agreement table)")


if __name__ == "__main__":
    main()
