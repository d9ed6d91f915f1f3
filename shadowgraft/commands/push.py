"""`shadowgraft push`."""

from __future__ import annotations

import click

from ..display import err, out, shown
from ..heap import imported
from . import _common as check


@click.command("push")
@click.argument("folder")
@click.argument("repo_id", callback=check.repo_id)
@click.option("--private", is_flag=True, help="Create the repo as private (no effect on an existing repo).")
@click.option("--revision", metavar="BRANCH", callback=check.branch, help="Upload to this branch, creating it from main when missing.")
@click.option("--commit-message", metavar="MSG", help="Commit title; defaults to one naming the instruct model, alpha and scope.")
def command(folder: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None) -> None:
    """Check FOLDER is a complete checkpoint, upload it to the Hub repo REPO_ID, print the URL.

    The token comes from `hf auth login` or HF_TOKEN.
    """
    from ..publish import left_out, push

    imported()

    out.print(shown(push(folder, repo_id, private=private, revision=revision, commit_message=commit_message)), soft_wrap=True)
    skipped = left_out(folder)
    if skipped:
        err.print(f"left out (hidden entries and sub-folders are never pushed): {shown(', '.join(skipped))}", emoji=False)
