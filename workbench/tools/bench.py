"""``workbench bench``: end-to-end merges of generated Llama-shaped models, measured.

Every merge is written as one mergekit YAML file, which ``workbench run`` reads unchanged; with
``--mergekit PATH`` the same file also goes through ``mergekit-yaml``, so the two tools are
compared on the same work in the same run. Each merge runs in a fresh process, as a user would run
it. Reported per method and tool: wall time of the process (of the fastest run), its start-up, the
merge time (wall time minus start-up), best and median over the runs, the input throughput over the
merge, and the largest peak resident memory of the processes (``ru_maxrss`` from ``wait4``, of
processes started from a small launcher). The inputs are read once before each method's runs, so
every run finds them in the page cache.

Start-up is measured in each run: for the workbench it is the process's wall time minus the
engine's own merge time (first read to final rename, from ``--stats-json``); mergekit reports no
merge time, so its command runs under a small timer (:data:`_MERGEKIT_TIMER`, in mergekit's own
interpreter) that imports ``mergekit-yaml``'s module first and times the command from there on:
its merge time excludes the interpreter, torch and mergekit's imports, as the workbench's does.
``--check`` reruns each merge with ``WORKBENCH_KERNELS=reference`` and
reports how far the outputs are apart, in bf16 steps.

Two more figures put the merges in context. The start-up of the commands a user waits on without
merging anything (``--help``, ``methods``, ``validate`` of the first benchmarked recipe, the TUI's
first screen), each a fresh process, so a regression in imports or plugin loading shows in the
numbers. And the machine's I/O floor for each merge: the time to read its inputs once from the
page cache and write as many bytes as its output holds, by a plain copy; no tool can merge faster
than that, so each merge time is also shown as a multiple of it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "della", "sce", "karcher")


def mergekit_recipe(method: str, models: Path, fine_tunes: int) -> dict[str, Any]:
    """The mergekit YAML of one benchmarked merge: float32 compute, bf16 output."""
    base = str(models / "base")
    tunes = [str(models / f"ft{i}") for i in range(1, fine_tunes + 1)]
    common: dict[str, Any] = {"dtype": "float32", "out_dtype": "bfloat16"}
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [base, *tunes]],
            **common,
        }
    if method == "task_arithmetic":
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": t, "parameters": {"weight": 0.5}} for t in tunes],
            **common,
        }
    if method in ("ties", "dare_ties"):
        models_ = [{"model": t, "parameters": {"weight": 1.0, "density": 0.5}} for t in tunes]
        return {
            "merge_method": method,
            "base_model": base,
            "models": models_,
            "parameters": {"normalize": True},
            **common,
        }
    if method == "della":
        models_ = [
            {"model": t, "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.15}} for t in tunes
        ]
        return {"merge_method": "della", "base_model": base, "models": models_, **common}
    if method == "sce":
        return {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": t} for t in tunes],
            "parameters": {"select_topk": 0.5},
            **common,
        }
    if method == "karcher":
        return {"merge_method": "karcher", "models": [{"model": t} for t in tunes], **common}
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": tunes[0],
            "models": [{"model": t} for t in tunes[:2]],
            "parameters": {"t": 0.5},
            **common,
        }
    raise SystemExit(f"bench has no recipe for method '{method}' (known: {', '.join(METHODS)})")


#: Runs a command as its own child and writes "wall_seconds peak_rss_kb" to a file. A process
#: started straight from the benchmark would carry the benchmark's own resident memory in its
#: high-water mark (its address space begins as a copy of, or shares, the parent's until exec), so
#: its children start from this small launcher instead.
_LAUNCHER = """
import os, sys, time
report, command = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


#: Runs ``mergekit-yaml SCRIPT ARGS`` in mergekit's interpreter and writes the seconds from the end
#: of its imports (the script's own module imported first) to the end of the command into REPORT.
_MERGEKIT_TIMER = """
import importlib, runpy, sys, time
report, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
importlib.import_module("mergekit.scripts.run_yaml")
start = time.perf_counter()
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code
with open(report, "w") as f:
    f.write(str(time.perf_counter() - start))
sys.exit(code)
"""


def mergekit_command(mergekit: Path, report: Path, args: list[str]) -> list[str]:
    """``mergekit-yaml ARGS`` under the timer, in the interpreter its script names."""
    first = mergekit.read_text().splitlines()[0] if mergekit.is_file() else ""
    python = first[2:].strip() if first.startswith("#!") else sys.executable
    return [python, "-c", _MERGEKIT_TIMER, str(report), str(mergekit), *args]


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Run a command, output discarded; return (wall seconds, exit status, peak RSS in bytes)."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, report.name, *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        if proc.returncode != 0:
            raise SystemExit(
                f"bench: `{' '.join(command)}` failed with status "
                f"{proc.returncode}:\n{proc.stderr.decode(errors='replace')[-2000:]}"
            )
        wall, rss_kb = report.read().split()
    return float(wall), proc.returncode, int(rss_kb) * 1024


def input_files(recipe: dict[str, Any]) -> list[Path]:
    """The safetensors files read by a recipe's models (the base counted once)."""
    folders = {m["model"] for m in recipe["models"]} | (
        {recipe["base_model"]} if "base_model" in recipe else set()
    )
    return sorted(f for folder in folders for f in Path(folder).glob("*.safetensors"))


def input_bytes(recipe: dict[str, Any]) -> int:
    return sum(f.stat().st_size for f in input_files(recipe))


def output_bytes(folder: Path) -> int:
    """Bytes of the weights a merge wrote (its safetensors files)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def startup_commands(recipe_file: Path) -> dict[str, list[str]]:
    """The commands whose start-up is timed: label -> command line."""
    workbench = [sys.executable, "-m", "workbench"]
    return {
        "workbench --help": [*workbench, "--help"],
        "workbench methods": [*workbench, "methods"],
        "workbench validate RECIPE": [*workbench, "validate", str(recipe_file)],
        "workbench tui (first screen)": [*workbench, "tui", "--exit-when-ready"],
    }


def measure_startup(recipe_file: Path, repeat: int) -> list[dict[str, Any]]:
    """Best and median wall time of each start-up command, each run a fresh process."""
    rows = []
    for label, command in startup_commands(recipe_file).items():
        walls = [measure(command)[0] for _ in range(max(3, repeat))]
        rows.append(
            {
                "command": label,
                "runs": len(walls),
                "best_s": round(min(walls), 3),
                "median_s": round(statistics.median(walls), 3),
            }
        )
    return rows


def io_floor(files: list[Path], nbytes_out: int, folder: Path, repeat: int) -> float:
    """Best time to read ``files`` once (from the page cache) and write ``nbytes_out`` bytes to a
    new file in ``folder`` (into the page cache, as a merge's output is written), by plain
    ``readinto``/``write`` calls through one 16 MiB buffer."""
    buffer = memoryview(bytearray(1 << 24))
    target = folder / ".workbench-bench-io-floor"
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        for path in files:
            with path.open("rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        with target.open("wb", buffering=0) as f:
            left = nbytes_out
            while left:
                left -= f.write(buffer[: min(left, len(buffer))])
        best = min(best, time.perf_counter() - start)
        target.unlink()
    return best


def warm_page_cache(files: list[Path]) -> None:
    """Read the inputs once, so every timed run (of either tool) finds them in the page cache
    rather than the first one paying for the disk."""
    buffer = bytearray(1 << 24)
    for path in files:
        with path.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def bf16_steps(out: Path, reference: Path) -> tuple[int, int]:
    """(largest distance in bf16 steps, number of elements apart) between two output folders."""
    import torch

    from workbench.checkpoint.folder import SafetensorsFolder

    worst = differing = 0
    with SafetensorsFolder(out) as ours, SafetensorsFolder(reference) as theirs:
        for name in ours.tensor_names():
            a, b = ours.read(name), theirs.read(name)
            if a.dtype != torch.bfloat16:
                a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
            # bf16 bit patterns as sign-magnitude integers: adjacent values differ by one.
            keys = [_ordered(x.contiguous().view(torch.int16).to(torch.int32)) for x in (a, b)]
            gap = (keys[0] - keys[1]).abs()
            worst = max(worst, int(gap.max()) if gap.numel() else 0)
            differing += int((gap > 0).sum())
    return worst, differing


def _ordered(bits: Any) -> Any:
    return bits.where(bits >= 0, -(bits & 0x7FFF))


def _summary(
    tool: str, method: str, runs: list[dict[str, float]], nbytes: int, floor: float
) -> dict[str, Any]:
    """Best/median merge time of a tool's runs (the rest of each run's wall time is its start-up)."""
    merges = [r["merge_s"] for r in runs]
    best = min(range(len(runs)), key=lambda i: merges[i])
    median = statistics.median(merges)
    return {
        "tool": tool,
        "method": method,
        "runs": len(runs),
        "wall_s": round(runs[best]["wall_s"], 3),
        "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
        "startup_s": round(runs[best]["wall_s"] - merges[best], 3),
        "merge_s_best": round(merges[best], 3),
        "merge_s_median": round(median, 3),
        "io_floor_s": round(floor, 5),
        "merge_over_floor_best": round(merges[best] / max(floor, 1e-9), 2),
        "merge_over_floor_median": round(median / max(floor, 1e-9), 2),
        "input_gb": round(nbytes / 1e9, 3),
        "input_gb_per_s_best": round(nbytes / max(merges[best], 1e-9) / 1e9, 3),
        "input_gb_per_s_median": round(nbytes / max(median, 1e-9) / 1e9, 3),
        "peak_rss_mb_max": round(max(r["rss"] for r in runs) / 2**20, 1),
    }


def run_bench(
    size: str,
    methods: list[str],
    fine_tunes: int,
    directory: Path,
    repeat: int,
    json_out: Path | None,
    console: Any,
    *,
    mergekit: Path | None = None,
    check: bool = False,
    device: str = "cpu",
) -> dict[str, list[dict[str, Any]]]:
    from workbench.checkpoint.synthetic import SIZES, write_family

    models = directory / size
    expected = ["base"] + [f"ft{i}" for i in range(1, fine_tunes + 1)]
    if not all((models / name / "config.json").is_file() for name in expected):
        console.print(
            f"generating {size} base + {fine_tunes} fine-tunes ({SIZES[size].parameter_count() / 1e6:.0f}M "
            f"parameters each, bf16) in {models} ..."
        )
        start = time.perf_counter()
        write_family(models, size, fine_tunes)
        console.print(f"generated in {time.perf_counter() - start:.1f} s")

    results = []
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as tmp:
        recipes = {method: mergekit_recipe(method, models, fine_tunes) for method in methods}
        recipe_files = {method: Path(tmp) / f"{method}.yaml" for method in methods}
        for method, recipe in recipes.items():
            recipe_files[method].write_text(yaml.safe_dump(recipe))
        startup = measure_startup(recipe_files[methods[0]], repeat) if methods else []
        _print_startup(startup, console)
        for method in methods:
            recipe, recipe_file = recipes[method], recipe_files[method]
            nbytes = input_bytes(recipe)
            warm_page_cache(input_files(recipe))
            out = directory / f"out-{size}-{method}"
            stats_file = Path(tmp) / "stats.json"

            def command(
                out: Path, recipe_file: Path = recipe_file, stats_file: Path = stats_file
            ) -> list[str]:
                return [
                    sys.executable,
                    "-m",
                    "workbench",
                    "run",
                    str(recipe_file),
                    "--out",
                    str(out),
                    "--overwrite",
                    "--quiet",
                    "--device",
                    device,
                    "--stats-json",
                    str(stats_file),
                ]

            runs = []
            for _ in range(repeat):
                wall, _, rss = measure(command(out))
                runs.append(
                    {"wall_s": wall, "merge_s": json.loads(stats_file.read_text())["seconds"], "rss": rss}
                )
            floor = io_floor(input_files(recipe), output_bytes(out), directory, repeat)
            row = _summary("workbench", method, runs, nbytes, floor)
            if check:
                reference_out = directory / f"out-{size}-{method}-reference"
                measure(command(reference_out), env={**os.environ, "WORKBENCH_KERNELS": "reference"})
                row["bf16_steps_vs_reference"], row["elements_apart"] = bf16_steps(out, reference_out)
                shutil.rmtree(reference_out, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            results.append(row)
            if mergekit is not None:
                mk_runs = []
                timer = Path(tmp) / "mergekit-seconds.txt"
                for _ in range(repeat):
                    wall, _, rss = measure(
                        mergekit_command(mergekit, timer, [str(recipe_file), str(out), "--no-copy-tokenizer"])
                    )
                    mk_runs.append({"wall_s": wall, "merge_s": float(timer.read_text()), "rss": rss})
                    shutil.rmtree(out, ignore_errors=True)
                mk = _summary("mergekit", method, mk_runs, nbytes, floor)
                row["speedup_best"] = round(mk["merge_s_best"] / max(row["merge_s_best"], 1e-9), 1)
                row["speedup_median"] = round(mk["merge_s_median"] / max(row["merge_s_median"], 1e-9), 1)
                row["wall_speedup"] = round(mk["wall_s"] / max(row["wall_s"], 1e-9), 1)
                results.append(mk)

    _print_table(results, console)
    report = {"startup": startup, "merges": results}
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_startup(rows: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    table = Table("start-up (fresh process)", "runs", "best s", "median s", box=None, pad_edge=False)
    for r in rows:
        table.add_row(r["command"], str(r["runs"]), f"{r['best_s']:.2f}", f"{r['median_s']:.2f}")
    console.print(table)


def _print_table(results: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    columns = [
        "method",
        "tool",
        "runs",
        "wall s best/median",
        "start-up s",
        "merge s best/median",
        "I/O floor s",
        "merge / floor best/median",
        "input GB",
        "input GB/s best/median",
        "peak RSS MB",
    ]
    speedups = any("speedup_best" in r for r in results)
    checks = any("bf16_steps_vs_reference" in r for r in results)
    columns += ["merge speed-up best/median", "wall speed-up"] * speedups + [
        "bf16 steps vs reference"
    ] * checks
    table = Table(*columns, box=None, pad_edge=False)
    for r in results:
        cells = [
            r["method"],
            r["tool"],
            str(r["runs"]),
            f"{r['wall_s']:.2f} / {r['wall_s_median']:.2f}",
            f"{r['startup_s']:.2f}",
            f"{r['merge_s_best']:.2f} / {r['merge_s_median']:.2f}",
            f"{r['io_floor_s']:.2f}",
            f"{r['merge_over_floor_best']:.1f}× / {r['merge_over_floor_median']:.1f}×",
            f"{r['input_gb']:.2f}",
            f"{r['input_gb_per_s_best']:.2f} / {r['input_gb_per_s_median']:.2f}",
            f"{r['peak_rss_mb_max']:.0f}",
        ]
        if speedups:
            cells += (
                [f"{r['speedup_best']}× / {r['speedup_median']}×", f"{r['wall_speedup']}×"]
                if "speedup_best" in r
                else ["", ""]
            )
        if checks:
            cells.append(
                f"{r['bf16_steps_vs_reference']} ({r['elements_apart']} elements)"
                if "bf16_steps_vs_reference" in r
                else ""
            )
        table.add_row(*cells)
    console.print(table)
