"""Start-up, guarded by counts rather than timings (a timed test is noisy on a shared 2-core machine).

In one fresh process, ``workbench methods``, ``validate``, ``plan`` and ``run`` together must build
the plugin registry exactly once, scan the entry points once and parse each distribution's
metadata at most once; importing the CLI and loading the registry must import none of torch,
numba, transformers or textual. The counters wrap the real functions, so a nested or repeated load
(a validator that looks up another method while the registry is being built) is counted too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

#: Runs in a fresh interpreter: counts while the four commands run, then prints the counts as JSON.
COUNTING = r"""
import collections, importlib.metadata as metadata, json, sys

import workbench.registry as registry_module

counts = {"loads": 0, "entry_point_scans": 0}
metadata_reads = collections.Counter()

real_load = registry_module.load_registry
def counting_load(*args, **kwargs):
    counts["loads"] += 1
    return real_load(*args, **kwargs)
registry_module.load_registry = counting_load

real_entry_points = metadata.entry_points
def counting_entry_points(**params):
    if params.get("group") == registry_module.ENTRY_POINT_GROUP:
        counts["entry_point_scans"] += 1
    return real_entry_points(**params)
metadata.entry_points = counting_entry_points

real_metadata = metadata.Distribution.metadata
def counting_metadata(self):
    metadata_reads[str(getattr(self, "_path", id(self)))] += 1
    return real_metadata.fget(self)
metadata.Distribution.metadata = property(counting_metadata)

from click.testing import CliRunner
from workbench.cli.main import main

recipe, out = sys.argv[1], sys.argv[2]
heavy = ("torch", "numba", "transformers", "textual")
registry_module.get_registry()
imported_at_load = [name for name in heavy if name in sys.modules]
exits = {}
for command in (["methods"], ["methods", "lines"], ["validate", recipe], ["plan", recipe, "--out", out],
                ["run", recipe, "--out", out, "--quiet"]):
    result = CliRunner().invoke(main, command)
    exits[" ".join(command[:2])] = [result.exit_code, result.output[-500:]]
print(json.dumps({**counts, "most_metadata_reads": max(metadata_reads.values(), default=0),
                  "imported_at_load": imported_at_load, "exits": exits}))
"""


@pytest.fixture(scope="module")
def counts(tiny_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("startup")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "lines",  # its schema validator looks up the method it wraps in the registry
                "base": str(tiny_family["base"]),
                "models": [{"model": str(tiny_family["ft1"])}, {"model": str(tiny_family["ft2"])}],
                "parameters": {"merge": "ties", "merge_parameters": {"normalize": True}},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", COUNTING, str(recipe), str(folder / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_command_succeeded(counts: dict) -> None:
    for command, (code, output) in counts["exits"].items():
        assert code == 0, f"workbench {command} exited {code}: {output}"


def test_the_registry_is_built_once_per_process(counts: dict) -> None:
    assert counts["loads"] == 1


def test_entry_points_are_scanned_once(counts: dict) -> None:
    assert counts["entry_point_scans"] == 1


def test_each_distributions_metadata_is_parsed_at_most_once(counts: dict) -> None:
    assert counts["most_metadata_reads"] == 1


def test_the_cli_and_the_registry_import_no_heavy_package(counts: dict) -> None:
    assert counts["imported_at_load"] == []


def test_the_load_counter_sees_a_second_load() -> None:
    """Guard for the counters above: a reload is counted, so they cannot pass by counting nothing."""
    code = COUNTING.split("from click.testing")[0] + (
        "registry_module.get_registry(); registry_module.get_registry(reload=True)\n"
        "print(json.dumps(counts))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"loads": 2, "entry_point_scans": 2}


#: A task_arithmetic merge in a fresh process, then which Numba kernels hold a compiled (or
#: cache-loaded) version: none may, since its ops take the torch path on CPU.
NUMBA_USE = r"""
import json, sys
from workbench.engine.run import run_recipe
run_recipe(sys.argv[1], out=sys.argv[2])
from workbench_kernels import finite, threshold, ties, weighted_sum
kernels = {"weighted_sum": weighted_sum._weighted_sum_numba, "finite": finite._count_non_finite_numba,
           "threshold": threshold._count_band_kernel_numba, "ties": ties._ties_numba}
print(json.dumps({name: len(kernel.overloads) for name, kernel in kernels.items()}))
"""


def _numba_use(
    tiny_family: dict[str, Path], folder: Path, method: str, model_parameters: dict | None = None
) -> dict[str, int]:
    recipe = folder / f"{method}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": method,
                "base": str(tiny_family["base"]),
                "models": [
                    {"model": str(tiny_family[key]), "parameters": model_parameters or {}}
                    for key in ("ft1", "ft2")
                ],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", NUMBA_USE, str(recipe), str(folder / f"out-{method}")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_task_arithmetic_merge_sets_up_no_numba_kernel(
    tiny_family: dict[str, Path], tmp_path: Path
) -> None:
    assert _numba_use(tiny_family, tmp_path, "task_arithmetic") == {
        "weighted_sum": 0,
        "finite": 0,
        "threshold": 0,
        "ties": 0,
    }


def test_the_numba_check_sees_a_kernel_that_ran(tiny_family: dict[str, Path], tmp_path: Path) -> None:
    """Guard for the check above: a ties merge runs its Numba kernels, and the check sees them."""
    used = _numba_use(tiny_family, tmp_path, "ties", {"density": 0.5})
    assert used["threshold"] >= 1 and used["ties"] >= 1
