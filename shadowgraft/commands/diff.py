"""`shadowgraft diff`."""

from __future__ import annotations

import click

from ..display import cell, err, human, out, shown
from ..heap import imported
from . import _common as check
from ._common import ByteProgress, MODEL_HELP, selection_options


@click.command("diff", help="Write TUNED - BASE: the full delta (for `apply --delta`), or with --rank/--energy a PEFT "
                              f"LoRA adapter. BASE and TUNED: each a {MODEL_HELP}.")
@click.argument("base")
@click.argument("tuned")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (created atomically).")
@click.option("--rank", type=click.IntRange(min=1), help="Write a PEFT LoRA adapter of this rank instead of the full delta.")
@click.option("--energy", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Per tensor, the smallest rank keeping this fraction of the delta's squared Frobenius norm "
                   "(e.g. 0.9); with --rank, that rank is the cap.")
@click.option("--dtype", default="auto", show_default=True, callback=check.dtype_name,
              help="Stored dtype. auto: the exact working precision for a full delta (F32 for 16-bit models, "
                   "F64 for F32 ones), F32 for adapter factors.")
@selection_options(default="linear", verb="diff")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=check.size_text,
              help="Full delta: largest output file.")
@click.option("--device", default="auto", show_default=True, callback=check.device_name, help="auto, cpu or cuda.")
@click.option("--strict", is_flag=True, help="Fail on NaN/Inf deltas, and (with --rank/--energy) on non-zero deltas "
                                             "that are not matrices instead of leaving them out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or report.")
def command(base: str, tuned: str, quiet: bool, **kw) -> None:
    from ..diff import diff

    imported()

    with ByteProgress(quiet, "diffing") as bar:
        res = diff(base=base, tuned=tuned, progress=bar.advance, on_total=bar.grow, **kw)
    if quiet:
        return
    for w in res.warnings:
        err.print(f"[yellow]warning:[/] {shown(w)}")
    from rich.table import Table

    if res.kind == "delta":
        t = Table(title=f"delta written to {shown(res.output)}")
        for col in ("tensors", "dtype", "shards", "written", "seconds"):
            t.add_column(col, justify="right")
        t.add_row(str(len(res.plan.items)), ",".join(sorted({i.dtype for i in res.plan.items})), str(len(res.plan.shards)),
                  human(res.bytes_written), f"{res.seconds:.2f}")
        out.print(t)
        return
    t = Table(title=f"shadow adapter written to {shown(res.output)}")
    for col in ("tensor", "shape", "rank", "energy kept", "rel. error", "svd"):
        t.add_column(col, justify="left" if col == "tensor" else "right")
    for r in res.tensors:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        if r["status"] == "lora":
            t.add_row(cell(r["name"]), shape, str(r["rank"]), f"{r['energy']:.4f}", f"{r['rel_error']:.2e}", r["method"])
        else:
            t.add_row(cell(r["name"]), shape, "-", "-", "-", r["status"])
    out.print(t)
    s = res.summary
    out.print(f"{s['modules']} LoRA modules (rank {s['rank_min']}..{s['rank_max']}), {s['dropped']} dropped, {s['zero']} zero; "
              f"energy kept {s['energy_total']:.4f} overall (relative Frobenius error {s['rel_error_total']:.4f}), "
              f"worst {shown(s['worst'])} at {s['energy_min']:.4f}; adapter {human(s['adapter_bytes'])} in {res.seconds:.2f} s")
