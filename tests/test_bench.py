"""``workbench bench``: what it measures is the merge's, not the benchmark process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from workbench.cli.main import main
from workbench.tools.bench import bf16_steps, io_floor, measure, mergekit_command


def test_a_child_does_not_inherit_the_benchmarks_resident_memory():
    ballast = torch.ones(100_000_000, dtype=torch.int32)  # 400 MB resident in this process
    wall, status, rss = measure(
        [sys.executable, "-c", "b = bytearray(50_000_000); b[::4096] = b'x' * len(b[::4096])"]
    )
    assert status == 0 and wall > 0
    assert 50_000_000 < rss < 200_000_000, rss
    del ballast


def test_bf16_steps_counts_distance_and_differing_elements(tmp_path):
    a = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.bfloat16)
    b = a.clone()
    b[1] = (
        torch.tensor([-2.0], dtype=torch.bfloat16).view(torch.int16).add(3).view(torch.bfloat16)
    )  # 3 steps away
    b[2] = -0.0  # +0 and -0 are the same value: 0 steps
    for folder, t in (("a", a), ("b", b)):
        (tmp_path / folder).mkdir()
        save_file({"w": t}, str(tmp_path / folder / "model.safetensors"))
    assert bf16_steps(tmp_path / "a", tmp_path / "b") == (3, 1)


def test_bench_runs_a_merge_and_checks_it_against_the_reference_kernels(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--size",
            "tiny",
            "--methods",
            "ties",
            "--dir",
            str(tmp_path / "models"),
            "--check",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (row,) = report["merges"]
    assert row["method"] == "ties" and row["tool"] == "workbench"
    assert row["bf16_steps_vs_reference"] == 0 and row["peak_rss_mb_max"] > 0 and row["merge_s_best"] > 0
    assert row["io_floor_s"] > 0 and row["merge_over_floor_best"] == pytest.approx(
        row["merge_s_best"] / row["io_floor_s"], rel=0.01
    )
    startup = {r["command"]: r for r in report["startup"]}
    assert set(startup) == {
        "workbench --help",
        "workbench methods",
        "workbench validate RECIPE",
        "workbench tui (first screen)",
    }
    assert all(r["runs"] == 3 and 0 < r["best_s"] <= r["median_s"] for r in startup.values())


def test_the_io_floor_reads_every_input_and_writes_the_output_size(tmp_path, monkeypatch):
    inputs = [tmp_path / "a.bin", tmp_path / "b.bin"]
    inputs[0].write_bytes(b"x" * 5_000_000)
    inputs[1].write_bytes(b"y" * 123)
    written: list[int] = []
    real_open = Path.open

    def spy(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        if "w" in mode:
            real_write = handle.write
            handle.write = lambda data: written.append(len(data)) or real_write(data)  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(Path, "open", spy)
    assert io_floor(inputs, 40_000_123, tmp_path, repeat=1) > 0
    assert sum(written) == 40_000_123
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # its scratch file is gone


def test_tui_exit_when_ready_opens_the_first_screen_and_leaves():
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "tui", "--exit-when-ready"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_mergekit_runs_under_a_timer_that_leaves_out_its_imports(tmp_path):
    """A stand-in ``mergekit-yaml`` whose module takes 0.5 s to import and whose command takes
    0.3 s: the timer reports the command alone, and the exit status is the command's."""
    package = tmp_path / "site" / "mergekit" / "scripts"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "run_yaml.py").write_text(
        "import sys, time\ntime.sleep(0.5)\n"
        "def main():\n    time.sleep(0.3)\n    open(sys.argv[2], 'w').write(sys.argv[1])\n    sys.exit(0)\n"
    )
    script = tmp_path / "mergekit-yaml"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom mergekit.scripts.run_yaml import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    report, written = tmp_path / "seconds.txt", tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    wall, status, _ = measure(mergekit_command(script, report, ["recipe.yml", str(written)]), env=env)
    assert status == 0 and written.read_text() == "recipe.yml"
    assert 0.3 <= float(report.read_text()) < wall - 0.5
