"""`shadowgraft apply`."""

from __future__ import annotations

import click

from ..display import err, human, out, shown
from ..heap import imported
from . import _common as check
from ._common import ByteProgress, MODEL_HELP, print_notes, print_plan, selection_options


@click.command("apply")
@click.option("--instruct", required=True, help=f"Model to graft onto ({MODEL_HELP}).")
@click.option("--base", help="Model the tuned one was fine-tuned from.")
@click.option("--tuned", multiple=True, help="Fine-tuned base model; repeat it, quote a glob ('run/checkpoint-*') "
              "or name a run folder to graft several checkpoints in one pass (one output folder each under --output).")
@click.option("--delta", help="A delta folder written by `shadowgraft diff`.")
@click.option("--adapter", help="A PEFT LoRA adapter trained on base.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (created atomically).")
@click.option("--alpha", default="1.0", show_default=True, metavar="A[,A...]", callback=check.alphas,
              help="Scale of the grafted change; a comma list (0.25,0.5,1.0) writes one output per value, OUT/alpha-<value>.")
@click.option("--alpha-for", multiple=True, metavar="REGEX=VALUE", callback=check.alpha_rules,
              help="Per-tensor alpha: the first rule whose regex matches a tensor's name sets it (repeatable).")
@click.option("--combine", type=click.Choice(["sum", "ties"]),
              help="Merge the deltas of several --tuned (all from --base) into ONE output: weighted sum, or TIES.")
@click.option("--weights", metavar="W1,W2,...", callback=check.weights, help="Weights of the --tuned deltas, in --tuned order (default 1 each).")
@click.option("--density", type=float, callback=check.density, help="TIES: fraction of each delta kept by magnitude; DARE: keep probability.")
@click.option("--sparsify", type=click.Choice(["dare"]), help="Drop delta elements at random (DARE) before combining.")
@click.option("--seed", default=0, show_default=True, type=int, help="DARE's seed (with the tensor name and index, it fixes the mask).")
@selection_options(default="linear", verb="graft")
@click.option("--device", default="auto", show_default=True, callback=check.device_name, help="auto, cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True, callback=check.dtype_name,
              help="Output dtype: auto keeps instruct's per tensor.")
@click.option("--max-shard-size", default=None, callback=check.size_text, help="e.g. 5GB; default mirrors instruct's shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--strict", is_flag=True, help="Fail if any grafted value is NaN or Inf.")
@click.option("--push-to-hub", metavar="REPO_ID", callback=check.repo_id, help="Upload the result to this Hub repo afterwards.")
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def command(quiet: bool, **kw) -> None:
    """Graft W_instruct + alpha * (W_tuned - W_base), a delta, or a LoRA adapter, into a new folder."""
    from .. import graft

    imported()

    if kw["push_to_hub"] and not kw["dry_run"]:
        # Offline or a bad id would otherwise fail only after the whole graft.
        from ..publish import check_push_target

        check_push_target(kw["push_to_hub"])
    kw["tuned"] = None if not kw["tuned"] else kw["tuned"][0] if len(kw["tuned"]) == 1 else list(kw["tuned"])
    kw["alpha_for"] = list(kw["alpha_for"])
    dry = kw["dry_run"]
    seen: set = set()
    with ByteProgress(quiet or dry, "grafting") as bar:

        def on_plan(plan):
            if dry:
                print_plan(plan)
            elif not quiet and (plan.warnings, plan.notes) not in seen:
                # A grid's outputs share their warnings and notes: say them once.
                seen.add((plan.warnings, plan.notes))
                print_notes(plan)
            bar.grow(plan.nbytes)

        res = graft.apply(**kw, progress=bar.advance, on_plan=on_plan)
    if dry:
        return
    for r in res.results:
        # Printed even with --quiet: values that are not numbers are never silent.
        if r.stats.nonfinite:
            where = f"{shown(str(r.output))}: " if len(res.results) > 1 else ""
            err.print(f"[yellow]warning:[/] {where}NaN/Inf values in {len(r.stats.nonfinite)} grafted tensor(s): "
                      + shown(", ".join(f"{k} ({v})" for k, v in list(r.stats.nonfinite.items())[:3])))
    if quiet:
        return
    from rich.table import Table

    many = len(res.results) > 1
    t = Table(title=f"grafted into {shown(str(res.output))}" if not many else f"{len(res.results)} outputs")
    for col in (["output", "alpha"] if many else []) + ["grafted", "copied", "cast", "written", "seconds", "GB/s"]:
        t.add_column(col, justify="left" if col == "output" else "right")
    for r in res.results:
        s = r.stats
        t.add_row(*([shown(str(r.output)), f"{r.alpha:g}"] if many else []), str(s.grafted), str(s.copied), str(s.cast),
                  human(s.bytes_written), f"{s.seconds:.2f}", f"{s.bytes_written / max(s.seconds, 1e-9) / 1e9:.2f}")
    out.print(t)
    if res.url:
        out.print(f"pushed to {shown(res.url)}")
