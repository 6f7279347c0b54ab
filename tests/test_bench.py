"""``workbench bench``: what it measures is the merge's, not the benchmark process's."""

from __future__ import annotations

import json
import sys

import torch
from click.testing import CliRunner

from workbench.bench import bf16_steps, measure
from safetensors.torch import save_file
from workbench.cli import main


def test_a_child_does_not_inherit_the_benchmarks_resident_memory():
    ballast = torch.ones(100_000_000, dtype=torch.int32)  # 400 MB resident in this process
    wall, status, rss = measure([sys.executable, "-c", "b = bytearray(50_000_000); b[::4096] = b'x' * len(b[::4096])"])
    assert status == 0 and wall > 0
    assert 50_000_000 < rss < 200_000_000, rss
    del ballast


def test_bf16_steps_counts_distance_and_differing_elements(tmp_path):
    a = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.bfloat16)
    b = a.clone()
    b[1] = torch.tensor([-2.0], dtype=torch.bfloat16).view(torch.int16).add(3).view(torch.bfloat16)  # 3 steps away
    b[2] = -0.0  # +0 and -0 are the same value: 0 steps
    for folder, t in (("a", a), ("b", b)):
        (tmp_path / folder).mkdir()
        save_file({"w": t}, str(tmp_path / folder / "model.safetensors"))
    assert bf16_steps(tmp_path / "a", tmp_path / "b") == (3, 1)


def test_bench_runs_a_merge_and_checks_it_against_the_reference_kernels(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--size", "tiny", "--methods", "ties", "--dir", str(tmp_path / "models"), "--check", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["method"] == "ties" and row["tool"] == "workbench"
    assert row["bf16_steps_vs_reference"] == 0 and row["peak_rss_mb_max"] > 0 and row["merge_s_best"] > 0
