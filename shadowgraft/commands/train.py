"""`shadowgraft train`."""

from __future__ import annotations

import os

import click

from ..display import err, out
from ..errors import ShadowgraftError
from ..heap import imported
from ._common import MODEL_HELP


def train_options(f):
    """The hyper-parameter flags shared by `train` and `shadow-ft` (defaults: the paper's recipe)."""
    opts = [
        click.option("--objective", type=click.Choice(["sft", "dpo"]), default="sft", show_default=True,
                     help="sft: learn the assistant replies; dpo: learn from prompt/chosen/rejected preference pairs."),
        click.option("--beta", type=float, default=0.1, show_default=True,
                     help="DPO: strength of the pull towards the starting model."),
        click.option("--lora-rank", type=int, help="Train a LoRA adapter of this rank instead of all weights."),
        click.option("--lora-alpha", type=float, help="LoRA scale numerator  [default: 2 x rank]"),
        click.option("--lora-dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input."),
        click.option("--lr", type=float, help="Peak learning rate  [default: 1e-5 full, 2e-4 LoRA]"),
        click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data."),
        click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs)."),
        click.option("--batch-size", type=int, default=2, show_default=True, help="Sequences per micro-batch per device."),
        click.option("--grad-accum", type=int, default=16, show_default=True, help="Micro-batches per optimizer step."),
        click.option("--max-length", type=int, default=4096, show_default=True, help="Truncate sequences to this many tokens."),
        click.option("--packing", is_flag=True,
                     help="Concatenate short examples into rows of --max-length tokens; each attends to itself only."),
        click.option("--warmup-ratio", type=float, default=0.1, show_default=True, help="Share of steps with linear warmup."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay."),
        click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Clip gradients to this norm (0: off)."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True,
                     help="Recompute activations in backward to save memory."),
        click.option("--seed", type=int, default=42, show_default=True, help="Seed for data order and LoRA init."),
        click.option("--log-every", type=int, default=1, show_default=True, help="Optimizer steps per train_log.jsonl row."),
        click.option("--save-every", type=int, help="Write a resumable checkpoint every N optimizer steps."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (torchrun: one GPU per rank)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress output."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("train")
@click.option("--model", required=True, help=f"Model to fine-tune, usually the BASE model ({MODEL_HELP}).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL: chat, ShareGPT, Alpaca or text records; DPO: preference pairs.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Run folder: weights, train_log.jsonl, checkpoints/.")
@click.option("--chat-template-from", metavar="MODEL", help="Format conversations with this model's chat template (the INSTRUCT model).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest weights file of a full fine-tune.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --output.")
@click.option("--overwrite", is_flag=True, help="Delete an existing --output and start over.")
@train_options
def command(**kw) -> None:
    """Fine-tune a model (full or LoRA) on a JSONL data set, in plain torch; runs under torchrun too."""
    from ..train import TrainConfig, train

    imported()

    config = TrainConfig(**kw)
    try:
        config.check()  # impossible flag values are usage errors (exit 2), as click's own are
    except ShadowgraftError as e:
        raise click.UsageError(str(e)) from None
    res = train(config=config, console=err)
    if not kw["quiet"] and os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        what = "LoRA adapter" if kw["lora_rank"] else "checkpoint"
        loss = f"{res.loss:.4f}" if res.loss is not None else "-"
        out.print(f"trained {res.steps - res.start_step} step(s) in {res.seconds:.1f} s, final loss {loss}; "
                  f"{what} in {res.output}")
