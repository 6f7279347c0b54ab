"""Outputs appear whole or not at all: every command that writes a folder holds a lock on it
(``<out>.lock``), builds it in ``<out>.partial/`` (marked as ours), and only a finished folder is moved
into place, never over a folder that appeared meanwhile unless the user said ``--overwrite``."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workbench.errors import OutputError

#: Errors of a write that found the disk (or the user's quota) full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: Free space kept beyond the estimated output: file-system metadata, sidecars, the manifest.
SPACE_MARGIN = 16 << 20

#: Marks a folder as an unfinished output of ours, so that only such a folder is ever removed.
PARTIAL_MARKER = ".workbench-partial"


class OutputInTheWay(OutputError):
    """A folder appeared at the output path while the run was building it; the finished result is kept."""


def publish(partial: Path, out_dir: Path, replace: bool = True) -> None:
    """Move the finished folder into place, replacing an old output only now that the new one is whole,
    and only with ``replace`` (``--overwrite``): a folder that appeared at ``out_dir`` during the run
    is kept, and so is the finished result, in ``partial``."""
    if out_dir.exists() and not replace:
        raise OutputInTheWay(
            f"{out_dir} appeared while this run was writing it (made by another program); it is left as it "
            f"is, and the finished result is kept in {partial}: run the same command with --resume "
            "--overwrite to replace it, or move the folders yourself."
        )
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


def check_real_file_system(out_dir: Path) -> None:
    """Refuse an output on a virtual file system (``/proc``, ``/sys``), which has no room for files."""
    folder, _ = free_space(out_dir)
    if shutil.disk_usage(folder).total == 0:
        raise OutputError(
            f"{out_dir} cannot hold files: {folder} is on a virtual file system (such as /proc or /sys), which "
            "has no space for them. Choose another --out."
        )


def check_free_space(out_dir: Path, nbytes: int) -> None:
    """Refuse to start a run whose output cannot fit on the disk it is written to."""
    folder, free = free_space(out_dir)
    if free < nbytes + SPACE_MARGIN:
        raise OutputError(
            f"not enough free space for {out_dir}: the output needs about {(nbytes + SPACE_MARGIN) / 1e9:.2f} GB,"
            f" the disk holding {folder} has {free / 1e9:.2f} GB free. Free some space or choose another --out."
        )


# One run per output: a second run on the same ``<out>`` is refused at once.

#: Beside ``<out>.partial``: the lock a run holds on its output while it writes it.
LOCK_SUFFIX = ".lock"


def lock_file(out_dir: Path) -> Path:
    """Where the lock on ``out_dir`` lives: ``<out>.lock``."""
    return out_dir.with_name(out_dir.name + LOCK_SUFFIX)


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` while a run builds and publishes it.

    ``flock`` on ``<out>.lock``: the kernel releases it when the holder exits, however it exits (kill -9
    included), so a lock is never stale and ``--resume`` after a killed run just works. A second run on
    the same output is refused at once, with the holder's process id, start time and command. The file is
    removed on release while still held; a run that opened it before the removal finds, once it gets
    the lock, that the path no longer names its file, and tries again."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the output is still built aside and published whole)
        yield
        return
    path = lock_file(out_dir)
    check_real_file_system(out_dir)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(
                f"cannot write beside {out_dir} ({path}: {exc.strerror}); choose another --out."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(
                f"another run is writing {out_dir} ({holder}); wait for it to finish, or choose another --out."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we opened: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        os.write(fd, f"pid {os.getpid()}, started {started}: {shlex.join(sys.argv)}\n".encode())
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """What the lock file says about its holder, bounded and escaped (it is another process's text)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    if not text:
        return "a process that has just started"
    return text if len(text) <= 300 and text.isprintable() else repr(text[:300])


@contextmanager
def building(out_dir: Path, replace: bool) -> Iterator[Path]:
    """The whole life of a simple output folder: lock ``out_dir``, yield a fresh ``<out>.partial/`` to
    fill, publish it when the block ends, remove it if the block fails (a folder that appeared at
    ``out_dir`` meanwhile is never replaced without ``replace``, and the result is then kept)."""
    with output_lock(out_dir):
        partial = start_partial(out_dir)
        try:
            yield partial
            publish(partial, out_dir, replace)
        except OutputInTheWay:
            raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
