"""The output manifest: every file of a merge with its size and sha256, and what makes a run resumable.

While a merge runs, ``<out>.partial/workbench_manifest.json`` lists each output file as soon as it
is whole, together with the identity of the run (recipe, inputs, output layout, environment). A
killed or interrupted run can then be continued with ``--resume``: files listed there, whose bytes
still hash to the recorded sha256, are kept; everything else is written again. The published
folder keeps the manifest, complete, as a record of what was written (``workbench verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from workbench.errors import OutputError

if TYPE_CHECKING:
    from workbench.engine.plan import MergePlan

MANIFEST_FILE = "workbench_manifest.json"
MANIFEST_VERSION = 1
_HASH_CHUNK = 1 << 24


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run_identity(plan: "MergePlan", device: str) -> dict[str, str]:
    """What a run's output depends on, hashed part by part, so that a refused resume can say which
    part changed. Inputs are identified by their files' sizes and modification times (hashing every
    input again would cost as much as the merge)."""
    from workbench._version import __version__

    inputs = {}
    for model in plan.inputs:
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in model.reader.files()]
        inputs[f"input {model.label} ({model.ref})"] = _digest(stats)
    return {
        "recipe": _digest(plan.recipe.to_yaml()),
        "output layout": _digest(
            [(f.name, [(t.name, t.dtype, list(t.shape)) for t in f.tensors]) for f in plan.files]
        ),
        "environment": _digest(
            {"workbench": __version__, "device": device, "kernels": os.environ.get("WORKBENCH_KERNELS", "")}
        ),
        **inputs,
    }


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


class Manifest:
    """The files of one output folder that are finished; saved atomically after every change, so a
    kill at any moment leaves either the old or the new list, never a torn one."""

    def __init__(
        self,
        directory: Path,
        identity: dict[str, str],
        files: dict[str, FileRecord] | None = None,
        complete: bool = False,
    ) -> None:
        self.directory = directory
        self.identity = identity
        self.files: dict[str, FileRecord] = dict(files or {})
        #: True once the run finished and every file of the folder is listed.
        self.complete = complete
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST_FILE

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {MANIFEST_VERSION}")
            files = {name: FileRecord(str(r["sha256"]), int(r["bytes"])) for name, r in data["files"].items()}
            for name in files:
                _check_name(path, name)
            return cls(
                directory,
                {str(k): str(v) for k, v in data["identity"].items()},
                files,
                data["complete"] is True,
            )
        except (FileNotFoundError, OutputError):
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OutputError(f"{path} is not a readable workbench manifest ({exc}).") from exc

    def changes(self, identity: dict[str, str]) -> list[str]:
        """The parts of ``identity`` that differ from the run this manifest was started by."""
        keys = sorted(set(identity) | set(self.identity))
        return [key for key in keys if identity.get(key) != self.identity.get(key)]

    def record(self, path: Path, sha256: str | None = None) -> None:
        """Add a finished file (hashing it unless its writer already did)."""
        record = FileRecord(sha256 or sha256_file(path), path.stat().st_size)
        with self._lock:
            self.files[path.relative_to(self.directory).as_posix()] = record
            self.save()

    def intact(self, name: str) -> bool:
        """Whether ``name`` is listed and its bytes on disk are still the ones recorded."""
        record = self.files.get(name)
        path = self.directory / name
        if record is None or not _inside(self.directory, path) or path.stat().st_size != record.bytes:
            return False
        return sha256_file(path) == record.sha256

    def save(self) -> None:
        data = {
            "version": MANIFEST_VERSION,
            "complete": self.complete,
            "identity": self.identity,
            "files": {name: {"sha256": r.sha256, "bytes": r.bytes} for name, r in sorted(self.files.items())},
        }
        scratch = self.path.with_name(self.path.name + ".tmp")
        with open(scratch, "w") as handle:
            handle.write(json.dumps(data, indent=1) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, self.path)


def _check_name(manifest: Path, name: str) -> None:
    """A manifest lists files of its own folder: relative POSIX paths that stay inside it."""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or "\0" in name or name.startswith("/") or ".." in parts or "." in parts:
        shown = repr(name[:200])
        raise OutputError(
            f"{manifest} lists the file {shown}, which is not a path inside its folder; the manifest was "
            "changed or damaged, and nothing it says is trusted."
        )


def _inside(directory: Path, path: Path) -> bool:
    """Whether ``path`` is a regular file that stays in ``directory`` once symbolic links are followed."""
    try:
        return path.is_file() and path.resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


def record_published(directory: Path, path: Path) -> None:
    """Add a file written into a published output (the recipe's evaluation scores) to its manifest."""
    Manifest.read(directory).record(path)


def verify_folder(directory: Path) -> list[str]:
    """Problems of a published output folder against its manifest (empty: every file intact, and no
    file the manifest does not list)."""
    try:
        manifest = Manifest.read(directory)
    except FileNotFoundError:
        return [
            f"{directory} has no {MANIFEST_FILE} (not written by workbench, or by a version before manifests)."
        ]
    except OutputError as exc:
        return [str(exc)]
    problems = (
        []
        if manifest.complete
        else [f"{manifest.path} is not marked complete: the run that wrote it did not finish."]
    )
    for name, record in sorted(manifest.files.items()):
        try:
            problem = _file_problem(directory, name, record)
        except OSError as exc:  # a name the file system refuses (too long, ...)
            problem = f"{name}: cannot be read ({exc.strerror})"
        if problem:
            problems.append(problem)
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if (path.is_file() or path.is_symlink()) and name != MANIFEST_FILE and name not in manifest.files:
            problems.append(f"{name}: not listed in the manifest (added after the run, or by something else)")
    return problems


def _file_problem(directory: Path, name: str, record: FileRecord) -> str | None:
    """What is wrong with one listed file of a published folder, or None."""
    path = directory / name
    if path.is_symlink():
        return f"{name}: a symbolic link (to {os.readlink(path)}), not a file the run wrote"
    if not _inside(directory, path):
        return f"{name}: missing"
    if path.stat().st_size != record.bytes:
        return f"{name}: {path.stat().st_size} bytes, the manifest says {record.bytes}"
    if sha256_file(path) != record.sha256:
        return f"{name}: sha256 differs from the manifest (the file was changed or is damaged)"
    return None
