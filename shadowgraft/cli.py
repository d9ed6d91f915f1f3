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


def untrusted(text: str) -> str:
    """Text from strangers' files (tensor names, paths), safe to print with rich on one line.

    Control characters are shown escaped instead of reaching the terminal, and
    rich markup in the text stays literal: ``untrusted("a[/]\x1b")`` prints
    ``a[/]\x1b`` as typed.
    """
    from rich.markup import escape

    return escape("".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(text.split())))


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


def selection_options(*, default: str = "linear", verb: str = "graft"):
    """``--scope`` / ``--include`` / ``--exclude``, spelled and meaning the same in every command."""
    scope_help = {"graft": "Which tensors are grafted", "compare": "Which tensors are compared",
                  "diff": "Which tensors the delta holds"}[verb]

    def deco(f):
        f = click.option("--exclude", multiple=True, metavar="REGEX", help=f"Never {verb} names matching these (repeatable).")(f)
        f = click.option("--include", multiple=True, metavar="REGEX", help=f"Only {verb} names matching one of these (repeatable).")(f)
        return click.option("--scope", default=default, show_default=True, type=click.Choice(["linear", "attn", "mlp", "all"]),
                            help=f"{scope_help}: block matrices and their biases (linear), their attention or MLP part, "
                                 "or every floating tensor (all).")(f)
    return deco


def progress_bar(quiet: bool):
    """A rich byte-progress context on a terminal; a no-op otherwise."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    if quiet or not err.is_terminal:
        return None
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True)


def print_plan(plan, verbose: bool = False) -> None:
    from rich.table import Table

    # The alpha column appears when alpha is not the default 1 everywhere (a grid value, --alpha-for rules).
    alphas = plan.alpha != 1.0 or bool(plan.alpha_for)
    t = Table(title=f"plan (alpha {plan.alpha:g})" if alphas else "plan", show_lines=False)
    for col in ("tensor", "action", *(("alpha",) if alphas else ()), "dtype", "shape", "bytes"):
        t.add_column(col, justify="right" if col in ("bytes", "alpha") else "left")
    for s in plan.shards:
        for i in s.items:
            if verbose or i.action != "copy":
                a = (f"{i.alpha:g}" if i.action == "graft" else "",) if alphas else ()
                t.add_row(untrusted(i.name), i.action, *a, i.dtype, "x".join(map(str, i.shape)) or "scalar", human(i.nbytes))
    if t.row_count:
        out.print(t)
    out.print(f"{plan.count('graft')} graft, {plan.count('copy')} copy, {plan.count('cast')} cast; "
              f"{len(plan.shards)} shard(s), {human(plan.nbytes)} to write")
    print_notes(plan)


def print_notes(plan) -> None:
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {untrusted(w)}", emoji=False)
    for n in plan.notes:
        err.print(f"[dim]note: {untrusted(n)}[/]", emoji=False)


def _register() -> None:
    # One module per subcommand under commands/, each exposing ``command``;
    # they import heavy libraries only when run, so start-up stays cheap.
    import importlib
    import pkgutil

    from . import commands

    for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        cli.add_command(importlib.import_module(f"{commands.__name__}.{m.name}").command)


def _on_sigterm(signum, frame):
    # Turn SIGTERM and SIGHUP into the same unwinding as Ctrl-C so temporary output is removed.
    _state["signal"] = signum
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        # A closed terminal or ssh session ends the run cleanly; under
        # ``nohup`` (SIGHUP ignored) the run goes on, as the user asked.
        signal.signal(signal.SIGHUP, _on_sigterm)
    # Past a file-size limit (ulimit -f) SIGXFSZ would kill us mid-write and
    # leave the temp folder; ignored, the write fails with EFBIG and is
    # cleaned up and reported like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _state.pop("signal", None)
    try:
        rc = cli.main(args=argv, prog_name="shadowgraft", standalone_mode=False)
        # Without standalone mode click returns the code of ctx.exit(n) / raise Exit(n).
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        # Usage errors are one line too; the command's --help has the rest.
        ctx = getattr(e, "ctx", None)
        print_error(e.format_message().rstrip(".") + (f"; see '{ctx.command_path} --help'" if ctx is not None else ""))
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _interrupted()
    except (ShadowgraftError, OSError) as e:
        if "signal" in _state and isinstance(e, OSError):
            # The unwinding after SIGHUP/SIGTERM tried to draw on a terminal
            # that is gone (EIO); cleanup already ran, the exit says why.
            _interrupted()
        if _state["debug"]:
            raise
        print_error(_one_line(e))
        sys.exit(1)
    except Exception as e:  # a bug, but still one line; --debug shows the traceback
        if _state["debug"]:
            raise
        print_error(f"{_one_line(e)} ({type(e).__name__}; this is a bug: rerun with --debug and report it)")
        sys.exit(1)


def _interrupted() -> None:
    try:
        err.print("interrupted; unfinished output was removed")
    except OSError:
        pass  # no terminal left to tell (SIGHUP)
    sys.exit(128 + _state.get("signal", signal.SIGINT))  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP


def print_error(text: str) -> None:
    """``error: text`` on stderr, always one line.

    Tensor and file names come from strangers' files: control characters are
    shown escaped rather than sent to the terminal, rich markup and emoji
    codes in them are not interpreted, and the length is bounded.
    """
    text = " ".join(text.split())
    if len(text) > 2000:
        text = text[:1200] + " ... " + text[-600:]
    err.print(f"[red]error:[/] {untrusted(text)}", soft_wrap=True, emoji=False)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


# Last, so that command modules can import anything defined above.
_register()
