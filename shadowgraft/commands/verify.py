"""`shadowgraft verify`."""

from __future__ import annotations

import click

from ..display import err, human, out, print_error, shown
from ..heap import imported
from ._common import progress_bar


@click.command("verify")
@click.argument("folder", type=click.Path())
@click.option("--quick", is_flag=True, help="Headers, index, sizes and shadowgraft.json only; do not read tensor values.")
@click.option("--hash", "hash_files", is_flag=True,
              help="Also compute each file's sha256 (one more full read); in a Hub cache, compare it with the blob name.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary; problems are still printed.")
def command(folder: str, quick: bool, hash_files: bool, quiet: bool) -> None:
    """Check a checkpoint folder: headers, index, sizes, shadowgraft.json, and NaN/Inf in every float tensor.

    A Hub id checks the snapshot apply would read (downloaded when missing);
    with --hash, each file's sha256 is also compared with its cached blob name.

    Exits 0 when all is well, 1 with one line per problem otherwise.
    """
    from ..verify import verify

    imported()

    bar = None if quick and not hash_files else progress_bar(quiet)
    progress = None
    if bar is not None:
        task = bar.add_task("verifying", total=None)
        bar.start()
        progress = lambda n: bar.advance(task, n)  # noqa: E731
    try:
        report = verify(folder, full=not quick, hash_files=hash_files, progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {shown(w)}", soft_wrap=True, emoji=False)
    for name, digest in report.sha256.items():
        out.print(f"{digest}  {shown(name)}", soft_wrap=True, emoji=False)
    if report.problems:
        for p in report.problems:
            print_error(p)
        raise click.exceptions.Exit(1)
    if not quiet:
        values = "every float value finite" if report.values_checked else "values not read (--quick)"
        out.print(f"ok: {shown(str(report.path))}: {report.n_tensors} tensors in {len(report.files)} file(s), "
                  f"{human(report.nbytes)}; {values}", soft_wrap=True, emoji=False)

