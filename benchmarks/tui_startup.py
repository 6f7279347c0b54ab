"""Time the terminal UI's first screen, as a user waits for it (a benchmark, not a timed test).

Each sample is a fresh process: ``workbench tui --exit-when-ready [RECIPE]`` opens the app headless,
waits until the first screen (Models) is mounted and laid out, and leaves. The script prints the
median and the spread over ``--repeat`` runs, then where the time goes in one extra run: the imports
(``-X importtime``, the biggest top-level packages) and the registry load. Run it on an idle machine:

    .venv/bin/python benchmarks/tui_startup.py [--repeat 5] [--recipe recipes/x.yaml]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_screen(recipe: str | None) -> float:
    """Seconds from process start to the first screen shown (and left)."""
    command = [sys.executable, "-m", "workbench.cli.main", "tui", "--exit-when-ready"]
    if recipe:
        command.append(recipe)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def import_profile(recipe: str | None, top: int = 12) -> list[tuple[float, str]]:
    """The slowest top-level imports (cumulative seconds) of one start-up, from ``-X importtime``."""
    command = [sys.executable, "-X", "importtime", "-m", "workbench.cli.main", "tui", "--exit-when-ready"]
    if recipe:
        command.append(recipe)
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match.group(2)) <= 1:  # top-level imports only
            rows.append((int(match.group(1)) / 1e6, match.group(3)))
    return sorted(rows, reverse=True)[:top]


def registry_load() -> float:
    """Seconds to discover and register every plugin, in a fresh process."""
    code = (
        "import time; t = time.perf_counter(); from workbench.registry import get_registry; "
        "get_registry(); print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--recipe", default=None, help="open this recipe (default: an empty composition)")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average (1 min) before: {load:.2f} on {os.cpu_count()} cores")
    first_screen(args.recipe)  # warm the file cache (and any compiled caches) once
    samples = [first_screen(args.recipe) for _ in range(args.repeat)]
    print(
        f"first screen: median {statistics.median(samples):.2f} s, min {min(samples):.2f} s, "
        f"max {max(samples):.2f} s over {len(samples)} runs"
    )
    print(f"registry load (fresh process): {registry_load():.2f} s")
    print("slowest top-level imports (cumulative):")
    for seconds, name in import_profile(args.recipe):
        print(f"  {seconds:6.3f} s  {name}")


if __name__ == "__main__":
    main()
