"""The ``ray`` executor on a local Ray instance: the same bytes as the local executor, failures that
leave nothing behind, a worker killed mid-task that is retried, ``--resume``, and the install hint.

One Ray instance (two CPUs) serves the module; the executor must reuse it, not start or stop its own.
Its workers get a site folder on PYTHONPATH holding a test plugin whose method kills its worker
process the first time it runs (a marker file says it did).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from plugin_site import install_plugin, local_ray

from workbench.checkpoint.output_folder import PARTIAL_MARKER, partial_folder
from workbench.cli.main import main
from workbench.engine.manifest import MANIFEST_FILE, Manifest

ray = pytest.importorskip("ray")

SHARD = "64KB"  # the tiny models become several output files

CRASHING_PLUGIN = """
    import os
    import pathlib

    from workbench import hookimpl
    from workbench_plugins.methods.linear import linear as Linear

    MARKER = pathlib.Path({marker!r})


    class CrashOnce(Linear):
        name = "crash_once_linear"
        summary = "linear, but the first process to merge model.norm.weight dies (ray executor tests)."

        def apply(self, tensors, base, params, model_params, ctx):
            if ctx.name == "model.norm.weight" and not MARKER.exists():
                MARKER.write_text(str(os.getpid()))
                os._exit(1)
            return super().apply(tensors, base, params, model_params, ctx)


    @hookimpl
    def register_methods(register):
        register(CrashOnce)
"""


@pytest.fixture(scope="module")
def ray_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start Ray once for the module (workers see the plugin site); stop it and check it is gone."""
    site = tmp_path_factory.mktemp("ray_site")
    install_plugin(
        site,
        "wb-crash-once",
        "crash_once",
        "wb_crash_once_plugin",
        CRASHING_PLUGIN.format(marker=str(site / "crashed")),
    )
    with local_ray(site) as pids:
        yield site
    assert not ray.is_initialized()
    alive = [
        pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert pids and not alive, f"Ray processes left running: {alive}"


def _recipe(folder: Path, method: str, a: Path, b: Path, weights: tuple[float, float] = (1.0, 1.0)) -> Path:
    recipe = folder / f"{method}.yaml"
    recipe.write_text(
        f"method: {method}\nmodels:\n"
        f"  - model: {json.dumps(str(a))}\n    parameters: {{weight: {weights[0]}}}\n"
        f"  - model: {json.dumps(str(b))}\n    parameters: {{weight: {weights[1]}}}\n"
    )
    return recipe


def _run(cli: CliRunner, recipe: Path, out: Path, *args: str) -> str:
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out), "--shard-size", SHARD, "-q", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _local_reference(cli: CliRunner, recipe: Path, out: Path) -> dict[str, bytes]:
    """The local executor's output at ``out`` (paths appear in the card, so the same path is used)."""
    moved = out.with_name(out.name + ".ray")
    out.rename(moved)
    _run(cli, recipe, out, "--executor", "local")
    reference = _files(out)
    shutil.rmtree(out)
    moved.rename(out)
    return reference


@pytest.mark.hook("register_executors")
def test_sharded_merge_is_byte_identical_to_local(
    ray_site: Path, cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, "linear", tiny_family["ft1"], tiny_family["ft2"], (0.3, 0.7))
    out = tmp_path / "out"
    _run(cli, recipe, out, "--executor", "ray")
    assert ray.is_initialized(), "the executor stopped a Ray instance it did not start"
    got = _files(out)
    assert sum(name.endswith(".safetensors") for name in got) >= 3
    assert got == _local_reference(cli, recipe, out)


def test_a_failing_shard_reports_the_cause_and_leaves_nothing(
    ray_site: Path, cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, "linear", tiny_family["ft1"], tiny_family["ft2"], (1.0, -1.0))
    out = tmp_path / "out"
    result = cli.invoke(
        main, ["run", str(recipe), "--out", str(out), "--shard-size", SHARD, "-q", "--executor", "ray"]
    )
    assert result.exit_code == 2, result.output
    assert "sum to 0" in result.output and "RayTaskError" not in result.output
    assert not out.exists() and not partial_folder(out).exists()


def test_a_killed_worker_is_retried(
    ray_site: Path,
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_cli_registry: None,
) -> None:
    monkeypatch.syspath_prepend(str(ray_site))  # the driver plans with the same plugin as the workers
    importlib.invalidate_caches()
    marker = ray_site / "crashed"
    recipe = _recipe(tmp_path, "crash_once_linear", tiny_family["ft1"], tiny_family["ft2"])
    out = tmp_path / "out"
    try:
        _run(cli, recipe, out, "--executor", "ray")
        assert marker.exists() and int(marker.read_text()) != os.getpid(), (
            "no worker died: the test proves nothing"
        )
        got = _files(out)
        assert got == _local_reference(cli, recipe, out)  # the marker exists: the local run does not crash
    finally:
        sys.modules.pop("wb_crash_once_plugin", None)


def test_resume_keeps_finished_files(
    ray_site: Path, cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    """A stopped run (finished shards listed in the manifest, one missing) is completed by ray workers."""
    recipe = _recipe(tmp_path, "linear", tiny_family["ft1"], tiny_family["ft2"])
    out = tmp_path / "out"
    _run(cli, recipe, out, "--executor", "local")
    reference = _files(out)
    partial = partial_folder(out)
    out.rename(partial)
    (partial / PARTIAL_MARKER).touch()
    manifest = Manifest.read(partial)
    shards = sorted(name for name in manifest.files if name.endswith(".safetensors"))
    kept = {name: (partial / name).stat().st_mtime_ns for name in shards[1:]}
    manifest.files = {name: manifest.files[name] for name in kept}
    manifest.complete = False
    manifest.save()
    (partial / shards[0]).unlink()
    _run(cli, recipe, out, "--executor", "ray", "--resume")
    assert _files(out) == reference
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not written again
    assert (out / MANIFEST_FILE).is_file()


def test_missing_ray_gives_the_install_hint(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    recipe = _recipe(tmp_path, "linear", tiny_family["ft1"], tiny_family["ft2"])
    out = tmp_path / "out"
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out), "-q", "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert "merge-workbench[ray]" in result.output
    assert not out.exists() and not partial_folder(out).exists()


def test_methods_with_whole_model_state_are_refused(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = tmp_path / "fusion.yaml"
    recipe.write_text(
        "method: ot_fusion\n"
        f"models:\n  - model: {json.dumps(str(tiny_family['ft1']))}\n  - model: {json.dumps(str(tiny_family['ft2']))}\n"
    )
    out = tmp_path / "out"
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out), "-q", "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert "ot_fusion" in result.output and "--executor local" in result.output
    assert not out.exists() and not partial_folder(out).exists()


def test_address_needs_a_remote_executor(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, "linear", tiny_family["ft1"], tiny_family["ft2"])
    out = tmp_path / "out"
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out), "-q", "--address", "10.0.0.1:6379"])
    assert result.exit_code == 2, result.output
    assert "--address" in result.output and "'local'" in result.output
    assert not out.exists() and not partial_folder(out).exists()


def test_finished_jobs_are_handed_over_as_they_finish(ray_site: Path, tmp_path: Path) -> None:
    """``on_done`` sees each result when its task ends (the quick job first), while the returned
    list keeps job order: the engine records a finished shard at once, so --resume keeps it.

    The order is fixed by an event, not by sleeps: the slow job ends only once the driver has been
    handed the quick job's result (its ``on_done`` writes a marker file), so on a busy machine it
    still finishes second, and an executor that handed results over only at the end would leave
    the slow job waiting out its deadline and returning "never told"."""
    import time

    from workbench_plugins.executors.ray import RayExecutor

    marker = tmp_path / "quick-job-handed-over"

    def job(name: str) -> str:
        if name == "quick":
            return "quick"
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "slow" if marker.exists() else "slow, never told"

    seen: list[str] = []

    def on_done(job_name: str, result: str) -> None:
        seen.append(result)
        if result == "quick":
            marker.write_text("")

    results = RayExecutor().run(["slow", "quick"], job, on_done)
    assert results == ["slow", "quick"]
    assert seen == ["quick", "slow"]
