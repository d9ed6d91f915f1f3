"""`shadowgraft demo`."""

from __future__ import annotations

import click

from ..display import out
from ..heap import imported


@click.command("demo")
@click.option("--workdir", type=click.Path(), default="demo-out", show_default=True, help="Where the tiny models go.")
def command(workdir: str) -> None:
    """Build a tiny offline base/instruct/tuned trio, graft it, and report what happened."""
    from ..demo import run_demo

    imported()

    run_demo(workdir, console=out)
