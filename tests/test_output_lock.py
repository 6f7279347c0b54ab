"""One run per output: a run holds a lock on ``<out>`` (``<out>.lock``, released by the kernel however
the holder ends), a second run on the same output is refused at once naming the holder, and a finished
output is never replaced without ``--overwrite``, checked again when the result is published."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_failures import invoke, linear_recipe, partial_of
from click.testing import CliRunner

from workbench.checkpoint.output_folder import OutputInTheWay, lock_file, output_lock
from workbench.cli.main import main
from workbench.engine.manifest import MANIFEST_FILE, Manifest
from workbench.engine.plan import build_plan
from workbench.engine.run import execute, run_recipe
from workbench.errors import OutputError
from workbench.recipe.schema import load_recipe
from workbench.registry import Registry


def _hold(out: Path) -> subprocess.Popen[str]:
    """Another process holding the lock on ``out`` until it is killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from workbench.checkpoint.output_folder import output_lock
        with output_lock(Path({str(out)!r})):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_lock_on_one_output_is_refused_and_names_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with output_lock(out):
        assert f"pid {os.getpid()}" in lock_file(out).read_text()
        with pytest.raises(
            OutputError, match=rf"another run is writing .*merged \(pid {os.getpid()}, started"
        ):
            with output_lock(out):
                pass
    assert not lock_file(out).exists()  # removed on release
    with output_lock(out):  # and free again
        pass


def test_a_run_on_an_output_another_run_holds_is_refused_at_once(
    cli: CliRunner, tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"])
    out = tmp_path / "merged"
    holder = _hold(out)
    try:
        refused = invoke(cli, "run", recipe, out)
        assert refused.exit_code == 2, refused.output
        assert f"pid {holder.pid}" in refused.output and "another run is writing" in refused.output
        assert not out.exists() and not partial_of(out).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops its lock; the file stays
        holder.wait()
    assert lock_file(out).exists()
    done = invoke(cli, "run", recipe, out)
    assert done.exit_code == 0, done.output
    verified = cli.invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert not lock_file(out).exists()


def test_a_folder_that_appears_during_a_run_is_kept_and_so_is_the_result(
    tiny_family: dict[str, Path], tmp_path: Path, registry: Registry
) -> None:
    recipe = load_recipe(linear_recipe(tmp_path, tiny_family["ft1"], tiny_family["ft2"]))
    out = tmp_path / "merged"
    plan = build_plan(recipe, registry, out=out)  # nothing at out yet: the plan is accepted
    out.mkdir()
    (out / "theirs.txt").write_text("another program's result")
    try:
        with pytest.raises(OutputInTheWay, match=r"merged appeared while this run was writing it"):
            execute(plan, registry)
    finally:
        plan.close()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = Manifest.read(partial_of(out))
    assert kept.complete and (partial_of(out) / MANIFEST_FILE).exists()
    # what the message says to do publishes the kept result
    result = run_recipe(recipe, out=out, overwrite=True, resume=True, registry=registry)
    assert result.out_dir == out and not (out / "theirs.txt").exists()
    assert not partial_of(out).exists()
    Manifest.read(out)  # the published folder carries its manifest


def test_lora_extract_takes_the_same_lock(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    holder = _hold(out)
    try:
        started = time.perf_counter()
        refused = CliRunner().invoke(
            main,
            [
                "lora",
                "extract",
                str(tiny_family["base"]),
                str(tiny_family["ft1"]),
                "-r",
                "2",
                "--out",
                str(out),
            ],
        )
        assert refused.exit_code != 0, refused.output
        assert f"pid {holder.pid}" in refused.output
        assert time.perf_counter() - started < 60  # refused, not waiting for the holder
        assert not out.exists() and not partial_of(out).exists()
    finally:
        holder.kill()
        holder.wait()
