"""A merge never loses work: the manifest of output files with sha256, ``--resume`` after kill -9
and Ctrl-C giving the output of an uninterrupted run, the free-space check, a disk that fills
mid-run, and ``workbench verify``.

The killed and interrupted runs are real processes. A test plugin's method (the mean of the
models) stalls at a chosen tensor and says so through a file, so the signal arrives mid-merge at a
known point; it also logs every tensor it computes, which shows what a resumed run skipped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_failures import WIDE, partial_of
from click.testing import CliRunner
from plugin_site import install_plugin
from safetensors.torch import load_file

from workbench.checkpoint.safetensors_io import StreamingFileWriter
from workbench.cli.main import main

SHARD = "24KB"  # the tiny models become a dozen or more output files

STALLING_PLUGIN = """
    import os
    import pathlib
    import time

    from workbench import hookimpl
    from workbench.method import MergeMethod, MethodParameters


    class StallingMean(MergeMethod):
        name = "stalling_mean"
        summary = "Mean of the models; logs each tensor and stalls at $STALL_AT (resume tests)."
        Parameters = MethodParameters
        min_models = 2

        def apply(self, tensors, base, params, model_params, ctx):
            with open(os.environ["STALL_LOG"], "a") as log:
                log.write(ctx.name + "\\n")
            if ctx.name == os.environ.get("STALL_AT"):
                pathlib.Path(os.environ["STALL_SIGNAL"]).touch()
                time.sleep(300)
            out = tensors[0].to(ctx.compute_dtype)
            for t in tensors[1:]:
                out = out + t.to(ctx.compute_dtype)
            return out / len(tensors)


    @hookimpl
    def register_methods(register):
        register(StallingMean)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder holding the stalling plugin as an installed distribution (for subprocesses)."""
    site = tmp_path_factory.mktemp("site")
    install_plugin(site, "wb-stalling", "stalling", "wb_stalling_plugin", STALLING_PLUGIN)
    return site


def _recipe(folder: Path, method: str, models: list[Path]) -> Path:
    lines = [
        f"method: {method}",
        "models:",
        *[f"  - {json.dumps(str(m))}" for m in models],
        f"output: {{shard_size: {SHARD}}}",
    ]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _workbench(site: Path, args: list[str], log: Path, **env: str) -> subprocess.Popen[str]:
    environment = {
        **os.environ,
        **WIDE,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "STALL_LOG": str(log),
        **env,
    }
    environment.pop("WORKBENCH_PLUGINS", None)
    # A child inherits the signals its parent ignores, and Ctrl-C reaches Python only if SIGINT is not
    # ignored when it starts: a suite started in the background by a non-interactive shell (a CI job, a
    # `make test &`) runs with SIGINT ignored, and the stopped run then slept through the signal.
    return subprocess.Popen(
        [sys.executable, "-m", "workbench", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _finish(process: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before stalling:\n{process.communicate()[0]}")
        assert time.monotonic() < deadline, "the run never reached the stalling tensor"
        time.sleep(0.05)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _shards(folder: Path) -> dict[str, list[str]]:
    """Output file -> its tensors, from the index of a finished output."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, list[str]] = {}
    for tensor, file in weight_map.items():
        files.setdefault(file, []).append(tensor)
    return files


@pytest.fixture(scope="module")
def reference(
    site: Path, tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """An uninterrupted run of the stalling method (told never to stall), moved aside: what every
    resumed run must reproduce byte for byte when it writes to the same path."""
    folder = tmp_path_factory.mktemp("resume")
    recipe = _recipe(folder, "stalling_mean", [tiny_family["ft1"], tiny_family["ft2"]])
    out = folder / "out"
    code, output = _finish(
        _workbench(site, ["run", str(recipe), "--out", str(out), "-q"], folder / "ref.log")
    )
    assert code == 0, output
    shards = _shards(out)
    assert len(shards) >= 4, "the test needs an output of several files"
    digests = _digests(out)
    out.rename(folder / "reference")
    return {"folder": folder, "recipe": recipe, "out": out, "digests": digests, "shards": shards}


def _stall_in_third_file(reference: dict[str, object]) -> tuple[str, list[str]]:
    """The first tensor of the third output file, and the tensors of the two files before it."""
    shards: dict[str, list[str]] = reference["shards"]  # type: ignore[assignment]
    names = sorted(shards)
    return shards[names[2]][0], shards[names[0]] + shards[names[1]]


@pytest.mark.parametrize(
    "stop", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill-9", "ctrl-c", "sigterm"]
)
def test_a_stopped_run_resumes_to_the_output_of_an_uninterrupted_one(
    site: Path, reference: dict[str, object], stop: signal.Signals
) -> None:
    folder: Path = reference["folder"]  # type: ignore[assignment]
    out: Path = reference["out"]  # type: ignore[assignment]
    shutil.rmtree(out, ignore_errors=True)
    stall_at, finished_before = _stall_in_third_file(reference)
    signal_file, log = folder / f"stalled.{stop.name}", folder / f"stopped.{stop.name}.log"
    run = ["run", str(reference["recipe"]), "--out", str(out), "-q"]
    process = _workbench(site, run, log, STALL_AT=stall_at, STALL_SIGNAL=str(signal_file))
    _wait_for(signal_file, process)
    process.send_signal(stop)
    code, output = _finish(process)

    assert not out.exists()
    partial = partial_of(out)
    manifest = json.loads((partial / "workbench_manifest.json").read_text())
    assert manifest["complete"] is False
    # exactly the two files finished before the stall are listed, with the sha256 of their bytes
    listed = sorted(manifest["files"])
    assert listed == sorted(reference["shards"])[:2]  # type: ignore[arg-type]
    for name in listed:
        assert manifest["files"][name]["sha256"] == hashlib.sha256((partial / name).read_bytes()).hexdigest()
    if stop in (signal.SIGINT, signal.SIGTERM):  # SIGTERM stops a run as Ctrl-C does, with its own status
        assert code == (130 if stop == signal.SIGINT else 143), output
        assert (
            "stopped:" in output
            and ("interrupted" if stop == signal.SIGINT else "terminated (SIGTERM)") in output
            and "--resume" in output
            and "Traceback" not in output
        )
        assert "2 of" in output
        # the file cut short by the interruption is not left behind
        assert sorted(p.name for p in partial.glob("*.safetensors")) == listed
    else:
        assert code == -signal.SIGKILL

    resumed_log = folder / f"resumed.{stop.name}.log"
    code, output = _finish(_workbench(site, run + ["--resume"], resumed_log))
    assert code == 0, output
    assert _digests(out) == reference["digests"]
    assert not partial.exists()
    computed = resumed_log.read_text().split()
    assert not set(computed) & set(finished_before), "finished files were computed again"
    assert stall_at in computed


def test_a_second_run_on_the_same_output_is_refused_and_the_first_resumes_after_kill_9(
    site: Path, reference: dict[str, object]
) -> None:
    """Two runs on one --out: while the first works (stalled in its third file), the second is refused
    at once naming the first's pid, and touches nothing; kill -9 the first (the kernel drops its
    lock), and --resume finishes it byte-identical to an uninterrupted run."""
    folder: Path = reference["folder"]  # type: ignore[assignment]
    out: Path = reference["out"]  # type: ignore[assignment]
    shutil.rmtree(out, ignore_errors=True)
    stall_at, _ = _stall_in_third_file(reference)
    signal_file = folder / "stalled.two-runs"
    run = ["run", str(reference["recipe"]), "--out", str(out), "-q"]
    first = _workbench(site, run, folder / "first.log", STALL_AT=stall_at, STALL_SIGNAL=str(signal_file))
    try:
        _wait_for(signal_file, first)
        before = _digests(partial_of(out))
        code, output = _finish(_workbench(site, run, folder / "second.log"))
        assert code == 2, output
        assert f"pid {first.pid}" in output and "another run is writing" in output, output
        assert _digests(partial_of(out)) == before and not out.exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    code, output = _finish(_workbench(site, run + ["--resume"], folder / "after-kill.log"))
    assert code == 0, output
    assert _digests(out) == reference["digests"]


def _linear(tmp_path: Path, tiny_family: dict[str, Path]) -> Path:
    return _recipe(tmp_path, "linear", [tiny_family["ft1"], tiny_family["ft2"]])


def _run(cli: CliRunner, recipe: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = cli.invoke(main, ["run", str(recipe), "--out", str(out), "-q", *extra], env=WIDE)
    return result.exit_code, result.output


@pytest.fixture
def full_disk_after(monkeypatch: pytest.MonkeyPatch):
    """Make the output disk 'fill up' at the n-th tensor write (ENOSPC, as the kernel reports it)."""
    original = StreamingFileWriter.write

    def arm(calls: int) -> None:
        count = {"n": 0}

        def write(self: StreamingFileWriter, name: str, data: torch.Tensor) -> None:
            count["n"] += 1
            if count["n"] >= calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            original(self, name, data)

        monkeypatch.setattr(StreamingFileWriter, "write", write)

    yield arm
    monkeypatch.setattr(StreamingFileWriter, "write", original)


def test_a_full_disk_mid_run_is_named_keeps_finished_files_and_resumes(
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    full_disk_after,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _linear(tmp_path, tiny_family)
    expected_out = tmp_path / "expected"
    code, output = _run(cli, recipe, expected_out)
    assert code == 0, output
    files = sorted(_shards(expected_out))
    first_file_tensors = len(_shards(expected_out)[files[0]])

    out = tmp_path / "out"
    full_disk_after(first_file_tensors + 2)  # the second file fails part-way
    code, output = _run(cli, recipe, out)
    assert code == 2, output
    assert "ran out of space" in output and files[1] in output and "No space left on device" in output
    assert "--resume" in output and "1 of" in output and "Traceback" not in output
    assert not out.exists()
    partial = partial_of(out)
    assert sorted(p.name for p in partial.glob("*.safetensors")) == [files[0]]

    monkeypatch.undo()  # space was freed
    code, output = _run(cli, recipe, out, "--resume")
    assert code == 0, output
    expected = _digests(expected_out)
    got = _digests(out)
    # the card and recipe name the output folder; everything else is byte-identical
    differing = {name for name in expected if expected[name] != got.get(name)}
    assert differing <= {"README.md", "workbench_recipe.yaml", "workbench_manifest.json"}, differing
    assert set(got) == set(expected)
    for name in files:
        assert got[name] == expected[name]


def test_a_disk_full_before_any_file_finished_leaves_nothing(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, full_disk_after
) -> None:
    full_disk_after(1)
    out = tmp_path / "out"
    code, output = _run(cli, _linear(tmp_path, tiny_family), out)
    assert code == 2 and "ran out of space" in output and "nothing was written" in output, output
    assert not out.exists() and not partial_of(out).exists()


def test_not_enough_free_space_is_refused_before_starting(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workbench.checkpoint.output_folder as output_folder

    needed = sum(f.stat().st_size for f in tiny_family["ft1"].glob("*.safetensors"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output_folder.shutil, "disk_usage", lambda path: usage._replace(free=needed // 2))
    out = tmp_path / "out"
    code, output = _run(cli, _linear(tmp_path, tiny_family), out)
    assert code == 2, output
    assert "not enough free space" in output and str(tmp_path) in output and "GB free" in output
    assert not out.exists() and not partial_of(out).exists()


def _stopped_partial(
    cli: CliRunner,
    recipe: Path,
    out: Path,
    full_disk_after,
    monkeypatch: pytest.MonkeyPatch,
    after_writes: int,
) -> Path:
    full_disk_after(after_writes)
    code, output = _run(cli, recipe, out)
    assert code == 2 and partial_of(out).is_dir(), output
    monkeypatch.undo()
    return partial_of(out)


def test_resume_refuses_a_partial_output_of_another_recipe(
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    full_disk_after,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _linear(tmp_path, tiny_family)
    out = tmp_path / "out"
    partial = _stopped_partial(cli, recipe, out, full_disk_after, monkeypatch, 8)
    before = _digests(partial)
    recipe.write_text(
        recipe.read_text().replace("method: linear", "method: linear\nparameters: {normalize: false}")
    )
    code, output = _run(cli, recipe, out, "--resume")
    assert code == 2, output
    assert "cannot resume" in output and "different recipe" in output and "without --resume" in output
    assert _digests(partial) == before and not out.exists()


def test_resume_rewrites_a_finished_file_whose_bytes_changed(
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    full_disk_after,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _linear(tmp_path, tiny_family)
    expected_out = tmp_path / "expected"
    assert _run(cli, recipe, expected_out)[0] == 0
    out = tmp_path / "out"
    partial = _stopped_partial(cli, recipe, out, full_disk_after, monkeypatch, 8)
    damaged = sorted(partial.glob("*.safetensors"))[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    code, output = _run(cli, recipe, out, "--resume")
    assert code == 0, output
    assert damaged.name in _shards(out)
    assert (out / damaged.name).read_bytes() == (expected_out / damaged.name).read_bytes()


def test_a_run_without_resume_starts_over(
    cli: CliRunner,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    full_disk_after,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _linear(tmp_path, tiny_family)
    out = tmp_path / "out"
    partial = _stopped_partial(cli, recipe, out, full_disk_after, monkeypatch, 8)
    (partial / "stale.txt").write_text("left by the stopped run")
    code, output = _run(cli, recipe, out)
    assert code == 0, output
    assert not (out / "stale.txt").exists() and not partial.exists()


def test_the_manifest_lists_every_file_and_verify_checks_it(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert _run(cli, _linear(tmp_path, tiny_family), out)[0] == 0
    manifest = json.loads((out / "workbench_manifest.json").read_text())
    assert manifest["complete"] is True
    on_disk = {name: digest for name, digest in _digests(out).items() if name != "workbench_manifest.json"}
    assert {name: r["sha256"] for name, r in manifest["files"].items()} == on_disk
    assert all(r["bytes"] == (out / name).stat().st_size for name, r in manifest["files"].items())
    # the merged values are what the method defines (the mean), so the manifest describes a real merge
    a, b = (
        load_file(tiny_family[k] / "model.safetensors")["model.norm.weight"].double() for k in ("ft1", "ft2")
    )
    shard = _shards(out)
    norm_file = next(f for f, names in shard.items() if "model.norm.weight" in names)
    torch.testing.assert_close(
        load_file(out / norm_file)["model.norm.weight"].double(), (a + b) / 2, rtol=8e-3, atol=1e-6
    )

    result = cli.invoke(main, ["verify", str(out)], env=WIDE)
    assert result.exit_code == 0 and "ok" in result.output, result.output
    victim = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    (out / "config.json").unlink()
    result = cli.invoke(main, ["verify", str(out)], env=WIDE)
    assert result.exit_code == 1, result.output
    assert f"{victim.name}: sha256 differs" in result.output and "config.json: missing" in result.output


def test_the_local_executor_hands_over_each_finished_job() -> None:
    from workbench_plugins.executors.local import LocalExecutor

    seen: list[tuple[int, int]] = []
    assert LocalExecutor().run(
        [1, 2, 3], lambda job: job * 10, lambda job, result: seen.append((job, result))
    ) == [10, 20, 30]
    assert seen == [(1, 10), (2, 20), (3, 30)]


def test_a_disk_that_fills_while_the_manifest_is_saved_is_counted_as_the_manifest_says(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last shard is whole but the save that lists it finds the disk full: the message counts
    what the manifest on disk lists (what --resume keeps), not the list that never reached the disk."""
    from workbench.engine.manifest import Manifest

    recipe = _linear(tmp_path, tiny_family)
    expected = tmp_path / "expected"
    assert _run(cli, recipe, expected)[0] == 0
    shards = sorted(_shards(expected))
    original = Manifest.save

    def save(self: Manifest) -> None:
        if set(shards) <= set(self.files):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        original(self)

    monkeypatch.setattr(Manifest, "save", save)
    out = tmp_path / "out"
    code, output = _run(cli, recipe, out)
    monkeypatch.undo()
    assert code == 2 and "ran out of space" in output, output
    listed = json.loads((partial_of(out) / "workbench_manifest.json").read_text())["files"]
    assert len(listed) == len(shards) - 1
    assert f"{len(shards) - 1} of {len(shards)} output files are finished" in output, output
