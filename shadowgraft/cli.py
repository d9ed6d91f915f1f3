"""The ``shadowgraft`` entry point: the click group over the commands/ modules, and ``main``.

Errors are formatted in one place (``main``): a ``ShadowgraftError`` or a
missing file prints one line and exits 1; usage errors exit 2; ``--debug``
shows the traceback instead. What the commands share lives in
``commands/_common.py`` and ``display.py``, below this module.
"""

from __future__ import annotations

import signal
import sys

import click

from .commands import apply, demo, diff, push, shadow_ft, stats, train, verify
from .display import err, print_error
from .ending import end
from .errors import ShadowgraftError
from .heap import pause

_state = {"debug": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="shadowgraft", prog_name="shadowgraft")
def cli(debug: bool) -> None:
    """Compare checkpoints and graft fine-tuning deltas onto instruct models (Shadow-FT)."""
    _state["debug"] = debug


# One module per subcommand; each imports heavy libraries (torch) only when
# run, so `shadowgraft --help` stays instant.
for _command in (apply, demo, diff, push, shadow_ft, stats, train, verify):
    cli.add_command(_command.command)


def _on_sigterm(signum, frame):
    # Turn SIGTERM and SIGHUP into the same unwinding as Ctrl-C so temporary output is removed.
    _state["signal"] = signum
    raise KeyboardInterrupt


def console(argv: list[str] | None = None) -> None:
    """The ``shadowgraft`` script, ``python -m shadowgraft`` and ``python -m shadowgraft.train``:
    ``main`` in a process of its own.

    The collector is paused until the command has imported its libraries
    (``heap.imported``): a process that ends with the command need never
    look at those objects again. The process ends through ``ending.end``,
    which skips the interpreter's teardown where a process group's threads
    could not survive it.
    """
    pause()
    try:
        main(argv)
    except SystemExit as e:
        end(e.code)
    end(0)


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
    except click.exceptions.NoArgsIsHelpError as e:
        # A bare `shadowgraft`: the whole help, as click prints it, not an error line.
        e.show()
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
        # A library's multi-line text reads best joined; names from files are
        # escaped by print_error whatever path they come through.
        print_error(f"{' '.join(_one_line(e).splitlines())} ({type(e).__name__}; this is a bug: rerun with --debug and report it)")
        sys.exit(1)


def _interrupted() -> None:
    try:
        err.print("interrupted; unfinished output was removed")
    except OSError:
        pass  # no terminal left to tell (SIGHUP)
    sys.exit(128 + _state.get("signal", signal.SIGINT))  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        return f"{e.filename}: {e.strerror or e}"
    return str(e)
