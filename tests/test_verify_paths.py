"""A manifest is trusted only about its own folder: ``verify`` and ``--resume`` refuse a manifest that
lists paths outside it (``..``, absolute paths), flag listed files that are symbolic links, and report
files in the folder that the manifest does not list."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cli_failures import WIDE, invoke, linear_recipe, partial_of
from click.testing import CliRunner

from workbench.checkpoint.output_folder import PARTIAL_MARKER
from workbench.cli.main import main
from workbench.engine.manifest import MANIFEST_FILE


@pytest.fixture
def merged(cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"])
    out = tmp_path / "merged"
    done = invoke(cli, "run", recipe, out)
    assert done.exit_code == 0, done.output
    return recipe, out


def _list(folder: Path, name: str, target: Path) -> None:
    """Add ``name`` to the folder's manifest with the true size and sha256 of ``target``."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    data = target.read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _verify(cli: CliRunner, folder: Path) -> tuple[int, str]:
    result = cli.invoke(main, ["verify", str(folder)], env=WIDE)
    return result.exit_code, result.output


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_verify_refuses_a_manifest_listing_files_outside_its_folder(
    cli: CliRunner, merged: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    _, out = merged
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not part of any merge\n")
    name = os.path.relpath(secret, out) if kind == "relative" else str(secret)
    assert (out / name).resolve() == secret.resolve()  # the entry really reaches the file
    _list(out, name, secret)
    code, output = _verify(cli, out)
    assert code == 1, output
    assert "not a path inside its folder" in output and "ok" not in output.split("bad:")[0]


def test_verify_flags_a_listed_file_replaced_by_a_symbolic_link(
    cli: CliRunner, merged: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = merged
    copy = tmp_path / "config-copy.json"
    copy.write_bytes((out / "config.json").read_bytes())
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(copy)  # same bytes, but outside the folder
    code, output = _verify(cli, out)
    assert code == 1, output
    assert "config.json: a symbolic link" in output


def test_verify_reports_files_the_manifest_does_not_list(cli: CliRunner, merged: tuple[Path, Path]) -> None:
    _, out = merged
    shard = next(out.glob("*.safetensors"))
    (out / "model-00006-of-00005.safetensors").write_bytes(shard.read_bytes())
    (out / "notes").mkdir()
    (out / "notes" / "extra.txt").write_text("x")
    code, output = _verify(cli, out)
    assert code == 1, output
    assert "model-00006-of-00005.safetensors: not listed in the manifest" in output
    assert "notes/extra.txt: not listed in the manifest" in output


def test_resume_refuses_a_manifest_listing_files_outside_its_folder(
    cli: CliRunner, merged: tuple[Path, Path], tmp_path: Path
) -> None:
    recipe, out = merged
    partial = partial_of(out)
    out.rename(partial)  # as a stopped run leaves it
    (partial / PARTIAL_MARKER).write_text("unfinished\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("must not be touched\n")
    _list(partial, os.path.relpath(victim, partial), victim)
    result = invoke(cli, "run", recipe, out, "--resume")
    assert result.exit_code == 2, result.output
    assert "not a path inside its folder" in result.output
    assert victim.read_text() == "must not be touched\n" and not out.exists()
