"""``workbench sweep --executor ray`` on a local Ray instance: the same table as a local sweep, and a
candidate failing in a Ray worker recorded as failed while the others finish.

One Ray instance (two CPUs) serves the module; the sweep must reuse it, not start or stop its own.
Its workers get a site folder on PYTHONPATH holding the test evaluator, which reads the merged
weights and raises when a weight's norm is above its ``fail_above`` option.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from plugin_site import install_plugin, local_ray, tiny_ta_recipe

from workbench.cli.main import main
from workbench.engine.run import run_recipe
from workbench.evaluation.running import evaluate_output
from workbench.recipe.schema import EvaluatorSpec, load_recipe, parse_recipe
from workbench.registry import Registry, load_registry
from workbench.sweep.search import parse_setting, run_sweep

ray = pytest.importorskip("ray")

PROBE = """
    from workbench import hookimpl
    from workbench.evaluator import Evaluator, EvaluatorOptions


    class ProbeOptions(EvaluatorOptions):
        fail_above: float | None = None


    class RayProbe(Evaluator):
        name = "ray_probe"
        summary = "Norm of one MLP weight; fails above a limit (sweep-on-Ray tests)."
        Options = ProbeOptions

        def evaluate(self, model):
            norm = float(model.module.model.layers[0].mlp.up_proj.weight.detach().double().norm())
            if self.options.fail_above is not None and norm > self.options.fail_above:
                raise ValueError(f"norm {norm} is above {self.options.fail_above}")
            return {"norm": norm}


    @hookimpl
    def register_evaluators(register):
        register(RayProbe)
"""


@pytest.fixture(scope="module")
def ray_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start Ray once for the module, its workers seeing the probe plugin; stop it afterwards."""
    site = tmp_path_factory.mktemp("ray_sweep_site")
    install_plugin(site, "wb-ray-probe", "ray_probe", "wb_ray_probe_plugin", PROBE)
    try:
        with local_ray(site):
            yield site
    finally:
        sys.modules.pop("wb_ray_probe_plugin", None)


@pytest.fixture
def registry(
    ray_site: Path, monkeypatch: pytest.MonkeyPatch, fresh_cli_registry: None, _no_plugin_env: None
) -> Registry:
    """The driver's registry, with the same probe plugin as the workers."""
    monkeypatch.syspath_prepend(str(ray_site))
    importlib.invalidate_caches()
    loaded = load_registry()
    assert "ray_probe" in loaded.evaluators
    return loaded


@pytest.fixture
def recipe_file(tiny_family: dict[str, Path], tmp_path: Path) -> Path:
    return tiny_ta_recipe(tiny_family, tmp_path / "ta.yaml")


def direct_norm(recipe_file: Path, lam: float, out: Path, registry: Registry) -> float:
    """The probe on an independent merge of the candidate, computed without any sweep."""
    recipe = parse_recipe(recipe_file.read_text().replace("lambda: 0.5", f"lambda: {lam}"))
    run_recipe(recipe, out=out, registry=registry)
    return float(evaluate_output([EvaluatorSpec(name="ray_probe")], out, registry)["ray_probe"]["norm"])


def _table(output: str) -> list[list[str]]:
    """The ranked rows of the printed table (rank, id, settings, score, status)."""
    return [line.split() for line in output.splitlines() if line[:1].isdigit()]


def test_a_grid_sweep_on_ray_gives_the_local_table(
    cli: CliRunner, recipe_file: Path, registry: Registry, tmp_path: Path
) -> None:
    args = [
        "sweep",
        str(recipe_file),
        "--set",
        "parameters.lambda=0.2,0.6,1.0",
        "--set",
        "parameters.normalize=false,true",
        "-e",
        "ray_probe",
    ]
    local = cli.invoke(main, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    on_ray = cli.invoke(main, [*args, "--out", str(tmp_path / "ray"), "--executor", "ray"])
    assert on_ray.exit_code == 0, on_ray.output
    assert ray.is_initialized(), "the sweep stopped a Ray instance it did not start"
    assert _table(on_ray.output) == _table(local.output) and len(_table(local.output)) == 6

    rows = json.loads((tmp_path / "ray" / "results.json").read_text())["candidates"]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    local_rows = json.loads((tmp_path / "local" / "results.json").read_text())["candidates"]
    assert [(r["id"], r["settings"], r["score"]) for r in rows] == [
        (r["id"], r["settings"], r["score"]) for r in local_rows
    ]
    for lam in (0.2, 1.0):  # the scores are the probe's, not merely equal to each other
        want = direct_norm(recipe_file, lam, tmp_path / f"direct{lam}", registry)
        assert [
            r["score"]
            for r in rows
            if r["settings"] == {"parameters.lambda": lam, "parameters.normalize": False}
        ] == [pytest.approx(want)]
    assert (tmp_path / "ray" / "best.yaml").read_text() == (tmp_path / "local" / "best.yaml").read_text()


def test_a_candidate_failing_on_ray_is_recorded_and_the_others_finish(
    recipe_file: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    norms = {lam: direct_norm(recipe_file, lam, tmp_path / f"direct{lam}", registry) for lam in (0.2, 1.5)}

    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("a candidate ran in the driver, not in a Ray worker")

    monkeypatch.setattr("workbench.sweep.search.run_one", not_here)  # Ray workers import their own copy
    monkeypatch.setattr(
        "workbench.sweep.backends.run_one", not_here
    )  # the worker entry point, run in the driver
    high, low = sorted(norms, key=norms.__getitem__, reverse=True)
    limit = (norms[high] + norms[low]) / 2
    result = run_sweep(
        load_recipe(recipe_file),
        [parse_setting("parameters.lambda=0.2,1.5")],
        [EvaluatorSpec(name="ray_probe", options={"fail_above": limit})],
        tmp_path / "sweep",
        registry,
        executor="ray",
    )
    assert sorted(result.ran) == sorted(r.id for r in result.rows)
    ok, failed = result.rows
    assert (ok.settings, ok.status, ok.score) == ({"parameters.lambda": low}, "ok", pytest.approx(norms[low]))
    assert (failed.settings, failed.status) == ({"parameters.lambda": high}, "failed")
    assert (
        failed.error is not None
        and f"is above {limit}" in failed.error
        and "RayTaskError" not in failed.error
    )
    assert load_recipe(tmp_path / "sweep" / "best.yaml").parameters["lambda"] == low


def test_address_needs_the_ray_executor(
    cli: CliRunner, recipe_file: Path, registry: Registry, tmp_path: Path
) -> None:
    result = cli.invoke(
        main,
        [
            "sweep",
            str(recipe_file),
            "--set",
            "parameters.lambda=0.5",
            "-e",
            "ray_probe",
            "--address",
            "10.0.0.1:6379",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--executor ray" in result.output and not (tmp_path / "s").exists()


def test_missing_ray_gives_the_install_hint_before_anything_runs(
    cli: CliRunner, recipe_file: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = cli.invoke(
        main,
        [
            "sweep",
            str(recipe_file),
            "--set",
            "parameters.lambda=0.5",
            "-e",
            "ray_probe",
            "--executor",
            "ray",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "merge-workbench[ray]" in result.output and not (tmp_path / "s").exists()
