"""``workbench bench``: end-to-end merges of generated Llama-shaped models, measured.

Each merge runs in a fresh ``workbench run`` process, as a user would run it. Reported per method:
wall time of the process (of the fastest run), its start-up (wall time minus merge time: interpreter,
imports, planning, writing the card), the engine's own merge time (first read to final rename), best
and median over the runs, the input throughput over the merge, and the largest peak resident memory
of the processes (``ru_maxrss`` from ``wait4``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def _recipe(method: str, models: Path, fine_tunes: int) -> dict[str, Any]:
    tunes = [str(models / f"ft{i}") for i in range(1, fine_tunes + 1)]
    if method == "linear":
        return {"method": "linear", "models": [{"model": t, "parameters": {"weight": 1.0}} for t in tunes]}
    if method == "task_arithmetic":
        return {"method": "task_arithmetic", "base": str(models / "base"), "models": tunes, "parameters": {"lambda": 0.5}}
    if method == "slerp":
        return {"method": "slerp", "models": tunes[:2], "parameters": {"t": 0.5}}
    raise SystemExit(f"bench has no recipe for method '{method}' (known: linear, task_arithmetic, slerp)")


def measure(command: list[str]) -> tuple[float, int, int]:
    """Run a command; return (wall seconds, exit status, peak RSS in bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, proc.returncode, usage.ru_maxrss * 1024


def run_bench(size: str, methods: list[str], fine_tunes: int, directory: Path, repeat: int, json_out: Path | None, console: Any) -> list[dict[str, Any]]:
    from rich.table import Table

    from workbench.synthetic import SIZES, write_family

    models = directory / size
    expected = ["base"] + [f"ft{i}" for i in range(1, fine_tunes + 1)]
    if not all((models / name / "config.json").is_file() for name in expected):
        console.print(f"generating {size} base + {fine_tunes} fine-tunes ({SIZES[size].parameter_count() / 1e6:.0f}M parameters each, bf16) in {models} ...")
        start = time.perf_counter()
        write_family(models, size, fine_tunes)
        console.print(f"generated in {time.perf_counter() - start:.1f} s")

    results = []
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as tmp:
        for method in methods:
            recipe = Path(tmp) / f"{method}.yaml"
            recipe.write_text(yaml.safe_dump(_recipe(method, models, fine_tunes)))
            out = directory / f"out-{size}-{method}"
            runs = []
            for _ in range(repeat):
                stats_file = Path(tmp) / "stats.json"
                command = [sys.executable, "-m", "workbench.cli", "run", str(recipe), "--out", str(out), "--overwrite", "--quiet", "--stats-json", str(stats_file)]
                wall, code, rss = measure(command)
                if code != 0:
                    raise SystemExit(f"bench: `{' '.join(command)}` failed with status {code}")
                stats = json.loads(stats_file.read_text())
                runs.append({"wall_s": wall, "merge_s": stats["seconds"], "bytes_read": stats["bytes_read"], "rss": rss})
            shutil.rmtree(out, ignore_errors=True)
            merge_times = sorted(r["merge_s"] for r in runs)
            best = min(runs, key=lambda r: r["merge_s"])
            median = merge_times[len(merge_times) // 2]
            results.append({
                "method": method,
                "size": size,
                "fine_tunes": fine_tunes,
                "runs": len(runs),
                "wall_s": round(best["wall_s"], 3),
                "startup_s": round(best["wall_s"] - best["merge_s"], 3),
                "merge_s_best": round(best["merge_s"], 3),
                "merge_s_median": round(median, 3),
                "input_gb": round(best["bytes_read"] / 1e9, 3),
                "input_gb_per_s_best": round(best["bytes_read"] / best["merge_s"] / 1e9, 3),
                "input_gb_per_s_median": round(best["bytes_read"] / median / 1e9, 3),
                "peak_rss_mb_max": round(max(r["rss"] for r in runs) / 2**20, 1),
            })

    table = Table("method", "runs", "wall s", "start-up s", "merge s best/median", "input GB", "input GB/s best/median", "peak RSS MB (max)", box=None, pad_edge=False)
    for r in results:
        table.add_row(
            r["method"], str(r["runs"]), f"{r['wall_s']:.2f}", f"{r['startup_s']:.2f}",
            f"{r['merge_s_best']:.2f} / {r['merge_s_median']:.2f}", f"{r['input_gb']:.2f}",
            f"{r['input_gb_per_s_best']:.2f} / {r['input_gb_per_s_median']:.2f}", f"{r['peak_rss_mb_max']:.0f}",
        )
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")
    return results
