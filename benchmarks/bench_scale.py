"""Beyond RAM: the I/O floor, `shadowgraft apply` and mergekit on a trio larger than the machine's memory, cold cache.

Builds (once, cached under --workdir) a bf16 base/instruct/tuned trio shaped
like Qwen3-4B (36 layers, hidden 2560, intermediate 9728, 32/8 heads of 128,
q/k norms, vocabulary 151936, tied embeddings: 8.05 GB a model, 24 GB of
input), one shard at a time, never a whole model in memory. Then, for each
tool: ``sync``, drop the page cache (``/proc/sys/vm/drop_caches``, root
only), read the tool's own libraries once, and time the tool with a final
``sync`` included, so the output is on disk when the clock stops. Every byte
of the models comes from the disk, and the machine cannot hold them in RAM.

    .venv/bin/python benchmarks/bench_scale.py                            # Qwen3-4B-shaped, 8 GB a model
    .venv/bin/python benchmarks/bench_scale.py --gb 2 --tools floor,cpu    # smaller, same layout
    .venv/bin/python benchmarks/bench_scale.py --gb 0.003 --no-drop --delete --workdir /tmp/s   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TRIO_VERSION, Measurement, Trio, build_once, best_of, human, load_average, machine, measure, print_table  # noqa: E402
from agreement import verify_outputs  # noqa: E402
from bench_apply import PY, Tool, floor_cmd, mergekit_cmd, shadowgraft_cmd  # noqa: E402


class QwenShape(NamedTuple):
    """A Qwen3-style decoder: GQA with q/k RMSNorms, SwiGLU MLP, tied embeddings (Qwen3-4B: the defaults)."""

    layers: int = 36
    hidden: int = 2560
    intermediate: int = 9728
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (self.hidden,)),
                    (p + "self_attn.q_proj.weight", (q, self.hidden)),
                    (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                    (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                    (p + "self_attn.q_norm.weight", (self.head_dim,)),
                    (p + "self_attn.k_norm.weight", (self.head_dim,)),
                    (p + "self_attn.o_proj.weight", (self.hidden, q)),
                    (p + "post_attention_layernorm.weight", (self.hidden,)),
                    (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                    (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                    (p + "mlp.down_proj.weight", (self.hidden, self.intermediate))]
        return out + [("model.norm.weight", (self.hidden,))]

    def nbytes(self) -> int:
        """Bytes of one model in bf16 (counted without listing the tensors, so any size is cheap to ask about)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = 2 * q * self.hidden + 2 * kv * self.hidden + 3 * self.intermediate * self.hidden
        layer += 2 * self.hidden + 2 * self.head_dim  # RMSNorms: input, post-attention, q, k
        return 2 * (self.vocab * self.hidden + self.hidden + self.layers * layer)

    def config(self) -> dict:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}

    def label(self) -> str:
        return f"qwen3-L{self.layers}-h{self.hidden}-i{self.intermediate}-v{self.vocab}"

    def describe(self) -> str:
        what = "Qwen3-4B-shaped" if self == QwenShape() else "Qwen3-style"
        return (f"{what}: {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"vocab {self.vocab}, tied embeddings")


# Same proportions, smaller: (hidden, intermediate, heads, kv heads, head dim, vocab).
_GEOMETRIES = [(2560, 9728, 32, 8, 128, 151936), (1024, 3840, 16, 4, 64, 32768), (256, 960, 4, 2, 64, 4096),
               (64, 192, 2, 1, 32, 512)]


def shape_for_gb(gb: float) -> QwenShape:
    """Qwen3-4B's geometry with as many layers as ``gb`` holds (36 at 8.05 GB); below ~0.9 GB, narrower ones (>= 2 layers).

    >>> shape_for_gb(8.05) == QwenShape()
    True
    """
    target = gb * 1e9
    for hidden, inter, heads, kv, hd, vocab in _GEOMETRIES:
        zero = QwenShape(0, hidden, inter, heads, kv, hd, vocab).nbytes()
        per_layer = QwenShape(1, hidden, inter, heads, kv, hd, vocab).nbytes() - zero
        layers = round((target - zero) / per_layer)
        if layers >= 2:
            return QwenShape(layers, hidden, inter, heads, kv, hd, vocab)
    return QwenShape(2, *_GEOMETRIES[-1])


def build(workdir: Path, shape: QwenShape, shard_bytes: int) -> Trio:
    """Write (or reuse) the trio in a child process, so this process never holds a tensor (nor torch)."""
    def make(tmp: Path) -> None:
        subprocess.run([PY, __file__, "--build", json.dumps([str(tmp), shape._asdict(), shard_bytes])], check=True)

    root = workdir / "trios" / f"{shape.label()}-s{shard_bytes}"
    return Trio(build_once(root, f"a {human(3 * shape.nbytes())} trio ({shape.describe()})", make), shape)


def _build_child(spec: str) -> None:
    from shadowgraft.synthetic import make_trio

    root, fields, shard_bytes = json.loads(spec)
    shape = QwenShape(**fields)
    # make_trio writes one shard at a time: at most one shard's tensors in memory.
    make_trio(Path(root), names=shape.tensors(), shard_bytes=shard_bytes, config=shape.config())


def drop_caches() -> bool:
    """Flush dirty pages and empty the page cache; False when not allowed (not root, a container)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def pick_tools(names: list[str], args) -> list[Tool]:
    venv = Path(args.mergekit_venv or Path(args.workdir) / "mergekit-venv")
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tools = []
    for key in names:
        if key == "floor":
            tools.append(Tool("floor", "I/O floor (read B,T + copy_file_range I)", floor_cmd))
        elif key == "cpu":
            tools.append(Tool("cpu", "shadowgraft apply (cpu)", shadowgraft_cmd("cpu"),
                              warm=[PY, "-c", "import shadowgraft.cli, shadowgraft.graft"]))
        elif key == "mergekit":
            if not (venv / "bin" / "mergekit-yaml").exists():
                print(f"mergekit not found in {venv}: install it with `bash benchmarks/mergekit_venv.sh`; skipping its row",
                      flush=True)
                continue
            info = sorted(venv.glob("lib/python*/site-packages/mergekit-*.dist-info"))
            version = info[-1].name.removesuffix(".dist-info").split("-", 1)[1] if info else "?"
            tools.append(Tool("mergekit", f"mergekit {version} task_arithmetic (bf16)", mergekit_cmd(venv), env=offline,
                              warm=[str(venv / "bin" / "python"), "-c", "import mergekit.merge, transformers"]))
        else:
            raise SystemExit(f"--tools: unknown tool {key!r} (floor, cpu, mergekit)")
    return tools


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--gb", type=float, default=QwenShape().nbytes() / 1e9,
                    help="bf16 GB per model (default: Qwen3-4B, 8.05); other sizes keep the layout with more or "
                         "fewer layers, and narrower layers below ~0.9 GB")
    ap.add_argument("--shard-size", type=float, help="GB per input shard (default 4, or a third of a smaller model)")
    ap.add_argument("--tools", default="floor,cpu,mergekit", help="comma list of floor,cpu,mergekit (default all)")
    ap.add_argument("--repeat", type=int, default=1, help="cold runs per tool; the fastest is reported (default 1)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"), help="trio and outputs (default bench-out)")
    ap.add_argument("--mergekit-venv", help="venv with mergekit-yaml (default WORKDIR/mergekit-venv)")
    ap.add_argument("--no-drop", action="store_true", help="do not drop the page cache before each run")
    ap.add_argument("--delete", action="store_true", help="delete the trio afterwards (it is kept for the next run)")
    ap.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        _build_child(args.build)
        return
    if args.gb <= 0 or args.repeat < 1:
        ap.error("--gb must be positive and --repeat at least 1")
    shape = shape_for_gb(args.gb)
    model = shape.nbytes()
    shard = int(args.shard_size * 1e9) if args.shard_size else (4_000_000_000 if model > 12e9 / 3 else -(-model // 3))
    tools = pick_tools(args.tools.split(","), args)
    # Three inputs, then at most two outputs kept for the agreement check.
    need = 5 * model
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    cached = (args.workdir / "trios" / f"{shape.label()}-s{shard}" / f".complete-v{TRIO_VERSION}").exists()
    if free + (3 * model if cached else 0) < need:
        sys.exit(f"{args.workdir}: {human(free)} free, the trio and two outputs need {human(need)}; "
                 f"pass a smaller --gb")
    trio = build(args.workdir, shape, shard)
    nin = trio.input_bytes()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    md: list[str] = []
    outroot = args.workdir / "scale-out"
    shutil.rmtree(outroot, ignore_errors=True)
    outroot.mkdir(parents=True)
    runs: dict[str, list[Measurement]] = {t.key: [] for t in tools}
    dropped = not args.no_drop
    load = load_average()
    outs = {}
    for r in range(args.repeat):
        for t in tools:
            out = outroot / t.key
            shutil.rmtree(out, ignore_errors=True)
            if not args.no_drop and not drop_caches():
                dropped = False
            if t.warm:
                # The tool's own libraries from the page cache: only the models are cold.
                subprocess.run(t.warm, env=t.env, stdout=subprocess.DEVNULL, check=False)
            cmd = t.command(trio, out)
            line = cmd if isinstance(cmd, str) else " ".join(_quote(c) for c in cmd)
            m = measure(f"{line} && sync", env=t.env, timeout_s=6 * 3600).check(t.label)
            print(f"  {t.label}: {m.seconds:.1f} s", flush=True)
            runs[t.key].append(m)
            if r == args.repeat - 1 and t.key in ("cpu", "mergekit"):
                outs[t.label] = out
            else:
                shutil.rmtree(out, ignore_errors=True)
    load = f"{load} before, {load_average()} after"
    best = {k: best_of(v) for k, v in runs.items()}
    floor = best["floor"].seconds if "floor" in best else None
    rows = []
    for t in tools:
        m = best[t.key]
        rows.append([t.label, f"{m.seconds:.1f}", f"{m.cpu_seconds:.1f}", f"{m.cpu_seconds / (nin / 1e9):.3f}",
                     f"{nin / m.seconds / 1e9:.2f}", f"{m.seconds / floor:.2f}" if floor else "—",
                     human(m.peak_rss), human(m.peak_anon)])
    cache = ("page cache dropped before each run (sync; echo 3 > /proc/sys/vm/drop_caches), then the tool's "
             "libraries read" if dropped else "page cache NOT dropped (needs root): only what does not fit in RAM is cold")
    title = (f"beyond RAM: {shape.describe()}; {human(model)}/model, {human(nin)} of input = {nin / ram:.2f}x RAM "
             f"({(nin + model) / ram:.2f}x with the output); "
             f"{cache}; sync included; best of {args.repeat}; {machine()}; load average {load}")
    print_table(title, ["tool", "seconds", "CPU s", "CPU s/GB of input", "GB/s of input", "x floor", "peak RSS",
                        "peak anon RSS"], rows, markdown=md)
    agree = verify_outputs(trio, outs, markdown=md)
    shutil.rmtree(outroot, ignore_errors=True)
    if args.delete:
        shutil.rmtree(trio.root, ignore_errors=True)
    if args.markdown:
        args.markdown.write_text("\n".join(md) + "\n")
    if not agree:
        sys.exit("shadowgraft's output disagrees with the reference (see the agreement table)")


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


if __name__ == "__main__":
    main()
