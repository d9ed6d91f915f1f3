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


def human(n: float) -> str:
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
                t.add_row(i.name, i.action, i.dtype, "x".join(map(str, i.shape)) or "scalar", human(i.nbytes))
    out.print(t)
    out.print(f"{plan.count('graft')} graft, {plan.count('copy')} copy, {plan.count('cast')} cast; "
              f"{len(plan.shards)} shard(s), {human(plan.nbytes)} to write")
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}")


def _register() -> None:
    # One module per subcommand under commands/, each exposing ``command``;
    # they import heavy libraries only when run, so start-up stays cheap.
    import importlib
    import pkgutil

    from . import commands

    for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        cli.add_command(importlib.import_module(f"{commands.__name__}.{m.name}").command)


_register()


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
