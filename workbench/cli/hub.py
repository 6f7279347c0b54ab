"""``workbench push``: upload a merged model folder to the Hugging Face Hub (also run after
``workbench run`` when the recipe has ``output.push``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from workbench.cli.common import escape, handle_errors, terminal


def push_output(
    folder: Path, repo: str, *, private: bool = False, revision: str | None = None, create_pr: bool = False
) -> Any:
    """Push ``folder`` and print where it went (shared by ``push`` and ``run``)."""
    from workbench.hub.push import push_folder

    console = terminal()
    console.print(f"pushing {escape(folder)} to {escape(repo)}{' (private)' if private else ''}...")
    result = push_folder(folder, repo, private=private, revision=revision, create_pr=create_pr)
    where = (
        f"pull request {result.pr_url}"
        if result.pr_url
        else f"{result.url}" + (f" (branch {result.revision})" if result.revision else "")
    )
    visibility = "private" if result.private else "public"
    console.print(
        f"[green]pushed[/] to {escape(where)} ({visibility} repo): {escape(result.commit_url)}", markup=True
    )
    return result


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", required=True, help="Hub repo id org/name (created if missing).")
@click.option(
    "--private", is_flag=True, help="Create the repo private; refuse to push into an existing public repo."
)
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option(
    "--create-pr", is_flag=True, help="Open a pull request against the default branch instead of committing."
)
@handle_errors
def push(folder: Path, repo: str, private: bool, revision: str | None, create_pr: bool) -> None:
    """Upload FOLDER (a `workbench run` output) to the Hub after checking its model card.

    The token comes from HF_TOKEN or the login cache (`hf auth login`) and is never printed or
    written. If an upload fails midway, running the same command again completes it.
    """
    push_output(folder, repo, private=private, revision=revision, create_pr=create_pr)
