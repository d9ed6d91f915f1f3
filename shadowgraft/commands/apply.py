"""`shadowgraft apply`."""

from __future__ import annotations

import click

from ..cli import MODEL_HELP, err, human, out, print_notes, print_plan, progress_bar, selection_options, untrusted


@click.command("apply")
@click.option("--instruct", required=True, help=f"Model to graft onto ({MODEL_HELP}).")
@click.option("--base", help="Model the tuned one was fine-tuned from.")
@click.option("--tuned", multiple=True, help="Fine-tuned base model; repeat it, quote a glob ('run/checkpoint-*') "
              "or name a run folder to graft several checkpoints in one pass (one output folder each under --output).")
@click.option("--delta", help="A delta folder written by `shadowgraft diff`.")
@click.option("--adapter", help="A PEFT LoRA adapter trained on base.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (created atomically).")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Scale of the grafted change.")
@selection_options(default="linear", verb="graft")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True, help="Output dtype: auto keeps instruct's per tensor.")
@click.option("--max-shard-size", default=None, help="e.g. 5GB; default mirrors instruct's shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--strict", is_flag=True, help="Fail if any grafted value is NaN or Inf.")
@click.option("--push-to-hub", metavar="REPO_ID", help="Upload the result to this Hub repo afterwards.")
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def command(quiet: bool, **kw) -> None:
    """Graft W_instruct + alpha * (W_tuned - W_base), a delta, or a LoRA adapter, into a new folder."""
    from .. import graft

    kw["tuned"] = None if not kw["tuned"] else kw["tuned"][0] if len(kw["tuned"]) == 1 else list(kw["tuned"])
    bar = progress_bar(quiet)
    dry = kw["dry_run"]

    def on_plan(plan):
        if dry:
            print_plan(plan)
        elif not quiet:
            print_notes(plan)
        if bar is not None and not dry:
            bar.start()
            if getattr(on_plan, "task", None) is None:
                on_plan.task = bar.add_task("grafting", total=0)
            bar.update(on_plan.task, total=bar.tasks[0].total + plan.nbytes)

    progress = (lambda n: bar.advance(on_plan.task, n)) if bar is not None else None
    try:
        res = graft.apply(**kw, progress=progress, on_plan=on_plan)
    finally:
        if bar is not None:
            bar.stop()
    if dry or quiet:
        return
    s = res.stats
    from rich.table import Table

    where = ", ".join(map(str, res.outputs)) if len(res.outputs) > 1 else res.output
    t = Table(title=f"grafted into {where}")
    for col in ("grafted", "copied", "cast", "written", "seconds", "GB/s"):
        t.add_column(col, justify="right")
    t.add_row(str(s.grafted), str(s.copied), str(s.cast), human(s.bytes_written), f"{s.seconds:.2f}",
              f"{s.bytes_written / max(s.seconds, 1e-9) / 1e9:.2f}")
    out.print(t)
    if s.nonfinite:
        err.print(f"[yellow]warning:[/] NaN/Inf values in {len(s.nonfinite)} grafted tensor(s): "
                  + untrusted(", ".join(f"{k} ({v})" for k, v in list(s.nonfinite.items())[:3])), emoji=False)
    if res.url:
        out.print(f"pushed to {res.url}")
