"""The ``shadowgraft`` command: parse, call the Python API, render with rich.

Errors are formatted in one place (``main``): a ``ShadowgraftError`` or a
missing file prints one line and exits 1; usage errors exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import signal
import sys

import click
from rich.console import Console

from .errors import ShadowgraftError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
_state = {"debug": False}

MODEL_HELP = "local folder, .safetensors file, or Hub id org/name[@revision]"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="shadowgraft", prog_name="shadowgraft")
def cli(debug: bool) -> None:
    """Compare checkpoints and graft fine-tuning deltas onto instruct models (Shadow-FT)."""
    _state["debug"] = debug


def progress_bar(quiet: bool):
    """A rich byte-progress context on a terminal; a no-op otherwise."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    if quiet or not err.is_terminal:
        return None
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True)


def print_plan(plan, verbose: bool = True) -> None:
    from rich.table import Table

    t = Table(title="plan", show_lines=False)
    for col in ("tensor", "action", "dtype", "shape", "bytes"):
        t.add_column(col, justify="right" if col == "bytes" else "left")
    for s in plan.shards:
        for i in s.items:
            if verbose or i.action != "copy":
                t.add_row(i.name, i.action, i.dtype, "x".join(map(str, i.shape)) or "scalar", _human(i.nbytes))
    out.print(t)
    out.print(f"{plan.count('graft')} graft, {plan.count('copy')} copy, {plan.count('cast')} cast; "
              f"{len(plan.shards)} shard(s), {_human(plan.nbytes)} to write")
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}")


@cli.command()
@click.option("--instruct", required=True, help=f"Model to graft onto ({MODEL_HELP}).")
@click.option("--base", help="Model the tuned one was fine-tuned from.")
@click.option("--tuned", help="Fine-tuned base model.")
@click.option("--delta", help="A delta folder written by `shadowgraft diff`.")
@click.option("--adapter", help="A PEFT LoRA adapter trained on base.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Output folder (created atomically).")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Scale of the grafted change.")
@click.option("--scope", default="linear", show_default=True, type=click.Choice(["linear", "attn", "mlp", "all"]),
              help="Which tensors are grafted: block matrices and their biases, attention or MLP ones only, or all.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only graft names matching one of these (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Never graft names matching these (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True, help="Output dtype: auto keeps instruct's per tensor.")
@click.option("--max-shard-size", default=None, help="e.g. 5GB; default mirrors instruct's shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--strict", is_flag=True, help="Fail if any grafted value is NaN or Inf.")
@click.option("--push-to-hub", metavar="REPO_ID", help="Upload the result to this Hub repo afterwards.")
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def apply(quiet: bool, **kw) -> None:
    """Graft W_instruct + alpha * (W_tuned - W_base), a delta, or a LoRA adapter, into a new folder."""
    from . import graft

    bar = progress_bar(quiet)
    dry = kw["dry_run"]

    def on_plan(plan):
        if dry:
            print_plan(plan)
        elif not quiet:
            for w in plan.warnings:
                err.print(f"[yellow]warning:[/] {w}")
        if bar is not None and not dry:
            bar.start()
            on_plan.task = bar.add_task("grafting", total=plan.nbytes)

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

    t = Table(title=f"grafted into {res.output}")
    for col in ("grafted", "copied", "cast", "written", "seconds", "GB/s"):
        t.add_column(col, justify="right")
    t.add_row(str(s.grafted), str(s.copied), str(s.cast), _human(s.bytes_written), f"{s.seconds:.2f}",
              f"{s.bytes_written / max(s.seconds, 1e-9) / 1e9:.2f}")
    out.print(t)
    if s.nonfinite:
        err.print(f"[yellow]warning:[/] NaN/Inf values in {len(s.nonfinite)} grafted tensor(s): "
                  + ", ".join(f"{k} ({v})" for k, v in list(s.nonfinite.items())[:3]))
    if res.url:
        out.print(f"pushed to {res.url}")


@cli.command()
@click.option("--workdir", type=click.Path(), default="demo-out", show_default=True, help="Where the tiny models go.")
def demo(workdir: str) -> None:
    """Build a tiny offline base/instruct/tuned trio, graft it, and report what happened."""
    from .demo import run_demo

    run_demo(workdir, console=out)


def _on_sigterm(signum, frame):
    # Turn SIGTERM into the same unwinding as Ctrl-C so temporary output is removed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="shadowgraft", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("interrupted; nothing was written")
        sys.exit(130)
    except (ShadowgraftError, OSError) as e:
        if _state["debug"]:
            raise
        err.print(f"[red]error:[/] {_one_line(e)}", soft_wrap=True)
        sys.exit(1)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())


if __name__ == "__main__":
    main()
