"""`shadowgraft stats`."""

from __future__ import annotations

import os
import sys

import click

from .. import reportfile
from ..display import err, out, shown
from ..errors import ShadowgraftError
from ..heap import imported
from . import _common as check
from ._common import ByteProgress, selection_options


@click.command("stats")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--tuned", metavar="T", help="A fine-tuned A: also compare the change T-A with B-A, per layer.")
@click.option("--json", "json_out", metavar="FILE|-", callback=check.out_file, help="Write the report as JSON; '-' prints only JSON on stdout.")
@click.option("--csv", "csv_out", metavar="FILE|-", callback=check.out_file, help="Write one CSV row per compared tensor.")
@click.option("--plot", "plot_out", metavar="FILE", callback=check.out_file, help="Plot sigma per layer and module kind (.png, .svg or .pdf).")
@click.option("--by", default="layer", show_default=True, type=click.Choice(["layer", "module", "tensor"]),
              help="Table to print after the summary.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="Also list the N tensors with the largest sigma (0: none; with --by tensor, 0 lists all).")
@click.option("--threshold", default=0.12, show_default=True, type=float, callback=check.positive_finite,
              help="Over this sigma_mean the weights diverge: likely not base and instruct of one release "
                   "(the pairs the paper grafts reach about 0.1).")
@click.option("--close", default=None, type=float, callback=check.positive_finite,
              help="Under this sigma_mean (default 0.03) the two are close siblings: graft with alpha 1 (Llama-3.1-8B: about 0.016); "
                   "between --close and --threshold, graft and try an alpha grid.")
@selection_options(default="all", verb="compare")
@click.option("--strict", is_flag=True, help="Fail if any compared tensor holds NaN or Inf values.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no tables; only the files asked for.")
def command(a: str, b: str, tuned: str | None, json_out: str | None, csv_out: str | None, plot_out: str | None,
            by: str, top: int, threshold: float, close: float, scope: str, include: tuple, exclude: tuple, strict: bool,
            quiet: bool) -> None:
    """How far apart checkpoints A (base) and B (instruct) are: sigma per tensor, layer and module, and a verdict.

    A and B are each a local folder, a .safetensors file, or a Hub id org/name[@revision].
    """
    from ..plot import check_plot
    from ..compare import stats

    imported()

    if json_out == "-" and csv_out == "-":
        raise click.UsageError("only one of --json and --csv can be '-' (stdout)")
    if close is not None and close > threshold:
        raise click.UsageError(f"--close must be a positive number no larger than --threshold ({threshold}), got {close}")
    files = [(kind, path) for kind, path in (("json", json_out), ("csv", csv_out), ("plot", plot_out)) if path and path != "-"]
    for i, (kind, path) in enumerate(files):
        for kind2, path2 in files[:i]:
            if os.path.abspath(os.path.expanduser(path)) == os.path.abspath(os.path.expanduser(path2)):
                raise click.UsageError(f"--{kind2} and --{kind} name the same file, {path}; give each its own")
        reportfile.check_target(path, kind)
    if plot_out:
        check_plot(plot_out)
    # With '-' stdout carries exactly one document; everything human goes to stderr.
    con = err if "-" in (json_out, csv_out) else out
    with ByteProgress(quiet, "comparing") as bar:
        report = stats(a, b, tuned=tuned, scope=scope, include=include, exclude=exclude, threshold=threshold, close=close,
                       progress=bar.advance, on_start=bar.grow)
    if strict and report.summary.n_nonfinite:
        bad = [t for t in report.tensors if t.sums.nonfinite]
        t = bad[0].sums
        where = " and ".join(f"{k} in {label}" for k, label in ((t.nan_a + t.inf_a, "A"), (t.nan_b + t.inf_b, "B")) if k)
        raise ShadowgraftError(f"'{bad[0].name}': NaN/Inf values, {where} ({len(bad)} tensor(s) affected); "
                               "check the inputs, or drop --strict to report them per tensor")
    if not quiet:
        report.print(con, by=by, top=top)
    elif report.summary.n_nonfinite:
        err.print(report.nonfinite_note(), emoji=False)  # never silent, even with --quiet
    for dest, kind, text in ((json_out, "json", lambda: report.to_json() + "\n"), (csv_out, "csv", report.to_csv)):
        if dest == "-":
            sys.stdout.write(text())
            sys.stdout.flush()
        elif dest:
            reportfile.write_text(dest, kind, text())
            if not quiet:
                con.print(f"wrote {shown(dest)}")
    if plot_out:
        report.plot(plot_out)
        if not quiet:
            con.print(f"wrote {shown(plot_out)}")
