"""Outputs appear whole or not at all: every command that writes a folder builds it in
``<out>.partial/`` (marked as ours), and only a finished folder is moved into place."""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

from workbench.errors import OutputError

#: Errors of a write that found the disk (or the user's quota) full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: Free space kept beyond the estimated output: file-system metadata, sidecars, the manifest.
SPACE_MARGIN = 16 << 20

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


def partial_folder(out_dir: Path) -> Path:
    """Where ``out_dir`` is built: ``<out>.partial/``."""
    return out_dir.with_name(out_dir.name + ".partial")


def start_partial(out_dir: Path, keep: bool = False) -> Path:
    """Create ``<out>.partial/``, replacing a leftover of an earlier run (or, with ``keep``,
    continuing in it) but never touching a folder of the user's."""
    partial = partial_folder(out_dir)
    if partial.exists():
        if not (partial / PARTIAL_MARKER).exists():
            raise OutputError(
                f"{partial} exists and was not made by workbench; move it away, the merge writes there first."
            )
        if keep:
            return partial
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("unfinished workbench output; safe to delete\n")
    return partial


def free_space(out_dir: Path) -> tuple[Path, int]:
    """The nearest existing folder above ``out_dir`` and the free bytes of its disk."""
    folder = out_dir.parent.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def check_free_space(out_dir: Path, nbytes: int) -> None:
    """Refuse to start a run whose output cannot fit on the disk it is written to."""
    folder, free = free_space(out_dir)
    if free < nbytes + SPACE_MARGIN:
        raise OutputError(
            f"not enough free space for {out_dir}: the output needs about {(nbytes + SPACE_MARGIN) / 1e9:.2f} GB,"
            f" the disk holding {folder} has {free / 1e9:.2f} GB free. Free some space or choose another --out."
        )
