"""`shadowgraft shadow-ft`."""

from __future__ import annotations

import click

from ..display import err, out, shown
from ..heap import imported
from . import _common as check
from ._common import MODEL_HELP
from .train import train_options


@click.command("shadow-ft")
@click.option("--base", required=True, help=f"The instruct model's base, which gets fine-tuned ({MODEL_HELP}).")
@click.option("--instruct", required=True, help=f"The model that receives the learned change ({MODEL_HELP}).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL: chat, ShareGPT, Alpaca or text records; DPO: preference pairs.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder: stages/ (stats, training) and model/ (the grafted instruct model).")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Scale of the grafted change.")
@click.option("--scope", default="linear", show_default=True, type=click.Choice(["linear", "attn", "mlp", "all"]),
              help="Which tensors are grafted (full fine-tuning; LoRA grafts what it trained).")
@click.option("--max-sigma", type=float, callback=check.positive_finite,
              help="Warn when base and instruct differ by more than this sigma_mean  [default: 0.12]")
@click.option("--push-to-hub", metavar="REPO_ID", callback=check.repo_id, help="Upload the grafted model to this Hub repo.")
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
@click.option("--overwrite", is_flag=True, help="Delete the run folder and start over (otherwise finished stages are reused).")
@click.option("--strict", is_flag=True, help="Fail if any grafted value is NaN or Inf (as apply --strict).")
@train_options
def command(**kw) -> None:
    """Fine-tune BASE on the data, graft the change onto INSTRUCT, write a model card (and push)."""
    from ..pipeline import shadow_ft

    imported()

    if kw["push_to_hub"]:
        # Offline or a bad id would otherwise fail only after training and grafting.
        from ..publish import check_push_target

        check_push_target(kw["push_to_hub"])
    quiet = kw.pop("quiet")
    res = shadow_ft(**kw, quiet=quiet, console=None if quiet else err)
    if res.nonfinite:  # printed even with --quiet, as apply does: values that are not numbers are never silent
        err.print(f"[yellow]warning:[/] NaN/Inf values in {len(res.nonfinite)} grafted tensor(s): "
                  + shown(", ".join(f"{k} ({v})" for k, v in list(res.nonfinite.items())[:3])), emoji=False)
    if not quiet:
        out.print(f"grafted model in {res.model}" + (f"; pushed to {res.url}" if res.url else ""))
