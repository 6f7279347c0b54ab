"""Outputs appear whole or not at all: every command that writes a folder builds it in
``<out>.partial/`` (marked as ours), and only a finished folder is moved into place."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from workbench.errors import OutputError

#: Marks a folder as an unfinished output of ours, so that only such a folder is ever removed.
PARTIAL_MARKER = ".workbench-partial"


def publish(partial: Path, out_dir: Path) -> None:
    """Move the finished folder into place, replacing an old output only now that the new one is whole."""
    (partial / PARTIAL_MARKER).unlink()
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old)  # onto the empty folder mkdtemp made: a unique name nobody else uses
        partial.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out_dir)


def final_folder(partial: Path) -> Path:
    """Where the folder being built in ``partial`` will be once published."""
    return partial.with_name(partial.name.removesuffix(".partial"))


def start_partial(out_dir: Path) -> Path:
    """Create ``<out>.partial/``, replacing a leftover of an earlier run but never a user's folder."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        if not (partial / PARTIAL_MARKER).exists():
            raise OutputError(f"{partial} exists and was not made by workbench; move it away, the merge writes there first.")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("unfinished workbench output; safe to delete\n")
    return partial
