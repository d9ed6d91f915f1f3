"""What several subcommands share: option groups, option checks, the progress bar, the plan table.

Option values are checked while click parses them, with the API's own
parsers (``parse_dtype``, ``parse_size``, ...), so a bad value is a usage
error (exit 2, click's "Invalid value for '--x'") before anything is read,
and the rule itself lives once, in the API.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from ..display import err, human, out, shown
from ..errors import ShadowgraftError

MODEL_HELP = "local folder, .safetensors file, or Hub id org/name[@revision]"


# -- option checks (click callbacks) ------------------------------------------


def _api_check(fn):
    """A click callback that runs ``fn(value)`` and turns its ShadowgraftError into a usage error."""

    def callback(ctx, param, value):
        if value is None:
            return value
        try:
            fn(value)
        except ShadowgraftError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from None
        return value

    return callback


def _positive_finite(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ShadowgraftError(f"{value} is not a positive finite number")


def _dtype(value: str) -> None:
    from ..dtypes import parse_dtype

    parse_dtype(value)


def _device(value: str) -> None:
    from ..graft import pick_device

    pick_device(value)


def _size(value: str) -> None:
    from ..shards import parse_size

    n = parse_size(value)
    if n is not None and n <= 0:
        raise ShadowgraftError(f"size '{value}' must be positive")


def _regexes(values: tuple[str, ...]) -> None:
    from ..plan import compile_patterns

    compile_patterns(values, "pattern")


def _out_file(value: str) -> None:
    """A file to write later (``-``: stdout): refuse now what would fail after all the work."""
    if value == "-":
        return
    p = Path(value).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ShadowgraftError(f"{value} is a folder; name a file")
    if not parent.is_dir():
        raise ShadowgraftError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ShadowgraftError(f"{value} cannot be written here (permission denied)")


def _alphas(value: str) -> None:
    from ..recipe import parse_alphas

    parse_alphas(value)


def _alpha_rules(values: tuple[str, ...]) -> None:
    from ..recipe import parse_alpha_for

    parse_alpha_for(values)


def _weights(value: str) -> None:
    from ..recipe import parse_floats

    parse_floats(value, "--weights")


def _density(value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ShadowgraftError(f"{value} is not in (0, 1]")


def _branch(value: str) -> None:
    from ..publish import check_branch

    check_branch(value)


def _repo_id(value: str) -> None:
    from ..publish import check_repo_id

    check_repo_id(value)


alphas = _api_check(_alphas)
alpha_rules = _api_check(_alpha_rules)
positive_finite = _api_check(_positive_finite)
dtype_name = _api_check(_dtype)
device_name = _api_check(_device)
size_text = _api_check(_size)
regexes = _api_check(_regexes)
out_file = _api_check(_out_file)
repo_id = _api_check(_repo_id)
branch = _api_check(_branch)
weights = _api_check(_weights)
density = _api_check(_density)


def selection_options(*, default: str = "linear", verb: str = "graft"):
    """``--scope`` / ``--include`` / ``--exclude``, spelled and meaning the same in every command."""
    scope_help = {"graft": "Which tensors are grafted", "compare": "Which tensors are compared",
                  "diff": "Which tensors the delta holds"}[verb]

    def deco(f):
        f = click.option("--exclude", multiple=True, metavar="REGEX", callback=regexes,
                         help=f"Never {verb} names matching these (repeatable).")(f)
        f = click.option("--include", multiple=True, metavar="REGEX", callback=regexes,
                         help=f"Only {verb} names matching one of these (repeatable).")(f)
        return click.option("--scope", default=default, show_default=True, type=click.Choice(["linear", "attn", "mlp", "all"]),
                            help=f"{scope_help}: block matrices and their biases (linear), their attention or MLP part, "
                                 "or every floating tensor (all).")(f)
    return deco


# -- rendering ------------------------------------------------------------------


def progress_bar(quiet: bool):
    """A rich byte-progress context on a terminal; a no-op otherwise."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    if quiet or not err.is_terminal:
        return None
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True)


class ByteProgress:
    """A byte-progress bar on a terminal, nothing otherwise: ``grow(n)`` adds work, ``advance`` is the API's callback.

    >>> with ByteProgress(quiet, "grafting") as p:                              # doctest: +SKIP
    ...     apply(..., on_plan=lambda plan: p.grow(plan.nbytes), progress=p.advance)
    """

    def __init__(self, quiet: bool, label: str):
        self.bar, self.label, self.task = progress_bar(quiet), label, None

    def grow(self, nbytes: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=0)
        self.bar.update(self.task, total=self.bar.tasks[0].total + nbytes)

    @property
    def advance(self):
        return None if self.bar is None else (lambda n: self.bar.advance(self.task, n))

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_plan(plan, verbose: bool = False) -> None:
    """The ``--dry-run`` table: every tensor that is not a plain copy, then the counts."""
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
                t.add_row(shown(i.name), i.action, *a, i.dtype, "x".join(map(str, i.shape)) or "scalar", human(i.nbytes))
    if t.row_count:
        out.print(t)
    out.print(f"{plan.count('graft')} graft, {plan.count('copy')} copy, {plan.count('cast')} cast; "
              f"{len(plan.shards)} shard(s), {human(plan.nbytes)} to write")
    print_notes(plan)


def print_notes(plan) -> None:
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {shown(w)}")
    for n in plan.notes:
        err.print(f"[dim]note: {shown(n)}[/]")
