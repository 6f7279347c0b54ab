"""``workbench sweep``: candidates merged and scored, ranked, resumable, failures reported.

Scores are checked against the evaluator run directly on an independent merge of each candidate
(``run_recipe`` + ``evaluate_output``). The evaluator is a test plugin that reads the merged
weights (the tiny models have no tokenizer, so the LM and zoo evaluators cannot score them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from plugin_site import tiny_ta_recipe

from workbench.cli.main import main
from workbench.engine.run import run_recipe
from workbench.errors import RecipeError
from workbench.evaluation.running import evaluate_output
from workbench.recipe.schema import EvaluatorSpec, load_recipe, parse_recipe
from workbench.registry import Registry, load_registry
from workbench.sweep.search import (
    candidate_id,
    generate,
    lower_is_better,
    parse_setting,
    run_sweep,
)

PROBE = """
from workbench import hookimpl
from workbench.evaluator import Evaluator, EvaluatorOptions


class ProbeOptions(EvaluatorOptions):
    layer: int = 0


class Probe(Evaluator):
    name = "tiny_probe"
    summary = "Norm of one MLP weight (test only)."
    Options = ProbeOptions

    def evaluate(self, model):
        weight = model.module.model.layers[self.options.layer].mlp.up_proj.weight.detach().double()
        return {"norm": float(weight.norm()), "loss": float((weight - 0.01).abs().mean())}


@hookimpl
def register_evaluators(register):
    register(Probe)
"""


@pytest.fixture
def probe_registry(
    make_plugin: Callable[..., str], fresh_cli_registry: None, _no_plugin_env: None
) -> Registry:
    """The registry with the test evaluator installed as a plugin (worker processes find it too)."""
    make_plugin("wb-sweep-probe", "sweep_probe", PROBE)
    registry = load_registry()
    assert "tiny_probe" in registry.evaluators
    return registry


@pytest.fixture
def recipe_file(tiny_family: dict[str, Path], tmp_path: Path) -> Path:
    return tiny_ta_recipe(tiny_family, tmp_path / "ta.yaml")


def direct_score(recipe_file: Path, lam: float, out: Path, registry: Registry, metric: str = "norm") -> float:
    """The evaluator on an independent merge of the candidate, computed without the sweep."""
    recipe = parse_recipe(recipe_file.read_text().replace("lambda: 0.5", f"lambda: {lam}"))
    result = run_recipe(recipe, out=out, registry=registry)
    return float(
        evaluate_output([EvaluatorSpec(name="tiny_probe")], result.out_dir, registry)["tiny_probe"][metric]
    )


@pytest.mark.hook("register_evaluators")
def test_grid_sweep_ranks_by_score_writes_best_and_resumes(
    cli: CliRunner, recipe_file: Path, probe_registry: Registry, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        "sweep",
        str(recipe_file),
        "--set",
        "parameters.lambda=0.2,0.6,1.0",
        "-e",
        "tiny_probe",
        "-o",
        "layer=1",
        "--out",
        str(sweep_dir),
    ]
    result = cli.invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((sweep_dir / "results.json").read_text())["candidates"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    expected = {}
    for lam in (0.2, 0.6, 1.0):
        out = tmp_path / f"direct{lam}"
        recipe = parse_recipe(recipe_file.read_text().replace("lambda: 0.5", f"lambda: {lam}"))
        run_recipe(recipe, out=out, registry=probe_registry)
        expected[lam] = evaluate_output(
            [EvaluatorSpec(name="tiny_probe", options={"layer": 1})], out, probe_registry
        )["tiny_probe"]["norm"]
    assert {r["settings"]["parameters.lambda"]: r["score"] for r in rows} == pytest.approx(expected)
    assert [r["score"] for r in rows] == sorted(expected.values(), reverse=True)  # 'norm': higher is better
    best_lambda = max(expected, key=lambda lam: expected[lam])
    assert load_recipe(sweep_dir / "best.yaml").parameters["lambda"] == best_lambda
    table_lines = [line for line in result.output.splitlines() if line[:1].isdigit()]
    assert [float(line.split()[2]) for line in table_lines] == [
        r["settings"]["parameters.lambda"] for r in rows
    ]
    assert str(sweep_dir / "best.yaml") in result.output
    # Only the best candidate's merge is kept.
    assert sorted(p.name for p in (sweep_dir / "candidates").iterdir()) == [
        candidate_id({"parameters.lambda": best_lambda})
    ]
    assert (sweep_dir / "results.csv").read_text().count("\n") == 4

    before = (sweep_dir / "results.json").read_bytes()
    again = run_sweep(
        load_recipe(recipe_file),
        [parse_setting("parameters.lambda=0.2,0.6,1.0")],
        [EvaluatorSpec(name="tiny_probe", options={"layer": 1})],
        sweep_dir,
        probe_registry,
    )
    assert again.ran == []
    assert (sweep_dir / "results.json").read_bytes() == before


def test_finished_merge_is_only_rescored_and_lower_is_better_metrics_sort_ascending(
    recipe_file: Path, probe_registry: Registry, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    settings = [parse_setting("parameters.lambda=0.3,0.9")]
    specs = [EvaluatorSpec(name="tiny_probe")]
    first = run_sweep(
        load_recipe(recipe_file),
        settings,
        specs,
        sweep_dir,
        probe_registry,
        metric="tiny_probe.loss",
        keep_outputs=True,
    )
    assert first.lower_is_better and all(r.merged for r in first.rows)
    expected = {
        lam: direct_score(recipe_file, lam, tmp_path / f"d{lam}", probe_registry, "loss")
        for lam in (0.3, 0.9)
    }
    assert [r.score for r in first.rows] == pytest.approx(sorted(expected.values()))
    (sweep_dir / "results.json").unlink()  # the merges stay: a rerun scores them without merging
    second = run_sweep(
        load_recipe(recipe_file),
        settings,
        specs,
        sweep_dir,
        probe_registry,
        metric="tiny_probe.loss",
        keep_outputs=True,
    )
    assert sorted(second.ran) == sorted(r.id for r in first.rows)
    assert not any(r.merged for r in second.rows)
    assert [r.score for r in second.rows] == [r.score for r in first.rows]


def test_a_failing_candidate_is_reported_and_the_others_finish(
    cli: CliRunner, recipe_file: Path, probe_registry: Registry, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = cli.invoke(
        main,
        [
            "sweep",
            str(recipe_file),
            "--set",
            "parameters.lambda=abc,0.5",
            "-e",
            "tiny_probe",
            "--out",
            str(sweep_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((sweep_dir / "results.json").read_text())["candidates"]
    assert [(r["settings"]["parameters.lambda"], r["status"]) for r in rows] == [
        (0.5, "ok"),
        ("abc", "failed"),
    ]
    assert "lambda" in rows[1]["error"]
    assert rows[0]["score"] == pytest.approx(
        direct_score(recipe_file, 0.5, tmp_path / "direct", probe_registry)
    )
    table_lines = [line for line in result.output.splitlines() if line[:1].isdigit()]
    assert "failed" in table_lines[-1] and "abc" in table_lines[-1]
    assert load_recipe(sweep_dir / "best.yaml").parameters["lambda"] == 0.5


def test_evaluator_errors_are_failed_candidates(
    cli: CliRunner, recipe_file: Path, probe_registry: Registry, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = cli.invoke(
        main,
        [
            "sweep",
            str(recipe_file),
            "--set",
            "parameters.lambda=0.5",
            "-e",
            "tiny_probe",
            "-o",
            "layer=99",
            "--out",
            str(sweep_dir),
        ],
    )
    assert result.exit_code == 1
    [row] = json.loads((sweep_dir / "results.json").read_text())["candidates"]
    assert row["status"] == "failed" and "IndexError" in row["error"]
    assert "no candidate succeeded" in result.output and not (sweep_dir / "best.yaml").exists()


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("parameters.lamda", "'lamda' is not a known key"),
        ("models.7.parameters.weight", "'7' is not an index"),
        ("output.colour", "'colour'"),
    ],
)
def test_bad_paths_are_refused_before_anything_runs(
    cli: CliRunner, recipe_file: Path, probe_registry: Registry, tmp_path: Path, path: str, said: str
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = cli.invoke(
        main, ["sweep", str(recipe_file), "--set", f"{path}=1,2", "-e", "tiny_probe", "--out", str(sweep_dir)]
    )
    assert result.exit_code == 2
    assert f"--set {path}" in result.output and said in result.output
    assert not sweep_dir.exists()


def test_unknown_evaluator_and_cma_are_clear_errors(
    recipe_file: Path, probe_registry: Registry, tmp_path: Path
) -> None:
    settings = [parse_setting("parameters.lambda=0.1,0.2")]
    with pytest.raises(Exception, match="tiny_prob"):
        run_sweep(
            load_recipe(recipe_file),
            settings,
            [EvaluatorSpec(name="tiny_prob")],
            tmp_path / "s",
            probe_registry,
        )
    with pytest.raises(RecipeError, match="cma needs --budget"):
        run_sweep(
            load_recipe(recipe_file),
            settings,
            [EvaluatorSpec(name="tiny_probe")],
            tmp_path / "s",
            probe_registry,
            search="cma",
        )


def test_random_search_samples_distinct_candidates_reproducibly() -> None:
    settings = [
        parse_setting("parameters.lambda=0.1,0.2,0.3,0.4"),
        parse_setting("parameters.weight=[1,0],[0,1],0.5"),
    ]
    assert settings[1].values == ([1, 0], [0, 1], 0.5)
    picks = generate(settings, "random", 5, seed=3)
    assert len(picks) == 5 and len({candidate_id(p) for p in picks}) == 5
    assert picks == generate(settings, "random", 5, seed=3)
    everything = generate(settings, "grid", None, 0)
    assert len(everything) == 12 and all(p in everything for p in picks)
    assert [generate(settings, "random", 5, seed=s) for s in range(4)] != [picks] * 4
    with pytest.raises(RecipeError, match="--budget"):
        generate(settings, "random", None, 0)


def test_metric_direction_follows_the_evaluator_contract() -> None:
    assert (
        lower_is_better("perplexity.perplexity")
        and lower_is_better("zoo_math.loss")
        and lower_is_better("val_loss")
    )
    assert not lower_is_better("zoo_math.accuracy") and not lower_is_better("lossless_ratio")


def test_parallel_jobs_give_the_same_scores(
    recipe_file: Path, probe_registry: Registry, tmp_path: Path
) -> None:
    settings = [parse_setting("parameters.lambda=0.4,0.8")]
    specs = [EvaluatorSpec(name="tiny_probe")]
    serial = run_sweep(load_recipe(recipe_file), settings, specs, tmp_path / "a", probe_registry)
    parallel = run_sweep(load_recipe(recipe_file), settings, specs, tmp_path / "b", probe_registry, jobs=2)
    assert [(r.id, r.score) for r in parallel.rows] == [(r.id, r.score) for r in serial.rows]
    assert all(r.status == "ok" for r in parallel.rows), [r.error for r in parallel.rows]


LAMBDA_FIT = """
from pathlib import Path

from safetensors import safe_open

from workbench import hookimpl
from workbench.evaluator import Evaluator, EvaluatorOptions

KEY = "model.layers.0.mlp.up_proj.weight"


def tensor(folder, key=KEY):
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            if key in handle.keys():
                return handle.get_tensor(key).double()
    raise KeyError(key)


class FitOptions(EvaluatorOptions):
    base: str = ""
    tuned: str = ""
    target: float = 0.7


class LambdaFit(Evaluator):
    name = "lambda_fit"
    summary = "The task-arithmetic lambda read back from the merged weights, scored against a target (test only)."
    Options = FitOptions

    def evaluate(self, model):
        merged = tensor(model.path)  # the file, not the loaded module, which transformers may round to bf16
        base, delta = tensor(self.options.base), tensor(self.options.tuned) - tensor(self.options.base)
        lam = float(((merged - base) * delta).sum() / (delta * delta).sum())
        return {"fit": -((lam - self.options.target) ** 2), "loss": (lam - self.options.target) ** 2, "lambda": lam}


@hookimpl
def register_evaluators(register):
    register(LambdaFit)
"""


@pytest.mark.parametrize("metric", ["lambda_fit.fit", "lambda_fit.loss"])
def test_cma_finds_the_optimum_of_a_smooth_objective_and_resumes(
    make_plugin: Callable[..., str],
    fresh_cli_registry: None,
    _no_plugin_env: None,
    tiny_family: dict[str, Path],
    tmp_path: Path,
    metric: str,
) -> None:
    """The objective peaks at lambda = 0.7, read back from the merged weights (merged = base + lambda * delta)."""
    make_plugin("wb-lambda-fit", "lambda_fit", LAMBDA_FIT)
    registry = load_registry()
    recipe = parse_recipe(
        f"method: task_arithmetic\nbase: '{tiny_family['base']}'\nmodels: ['{tiny_family['ft1']}']\n"
        f"output: {{dtype: float32}}\nparameters: {{lambda: 0.5}}\n"
    )
    specs = [
        EvaluatorSpec(
            name="lambda_fit", options={"base": str(tiny_family["base"]), "tuned": str(tiny_family["ft1"])}
        )
    ]
    settings = [parse_setting("parameters.lambda=0.1:1.5")]
    assert settings[0].bounds == (0.1, 1.5)
    sweep = run_sweep(
        recipe, settings, specs, tmp_path / "s", registry, search="cma", budget=16, seed=0, metric=metric
    )
    assert len(sweep.rows) == 16 and all(r.status == "ok" for r in sweep.rows), [r.error for r in sweep.rows]
    assert sweep.lower_is_better == metric.endswith("loss")
    lambdas = [r.settings["parameters.lambda"] for r in sweep.rows]
    assert all(0.1 <= lam <= 1.5 for lam in lambdas) and len(set(lambdas)) == 16
    for row in sweep.rows:  # each score is the objective at its own lambda (stored as float32)
        assert row.metrics["lambda_fit"]["lambda"] == pytest.approx(
            row.settings["parameters.lambda"], abs=1e-4
        )
        assert row.id == candidate_id(row.settings)
    assert sweep.best is not None and abs(sweep.best.settings["parameters.lambda"] - 0.7) < 0.05
    assert abs(lambdas[0] - 0.7) < abs(0.1 - 0.7)  # ranked best first, and better than the range's worst end
    assert (
        load_recipe(tmp_path / "s" / "best.yaml").parameters["lambda"]
        == sweep.best.settings["parameters.lambda"]
    )

    again = run_sweep(
        recipe, settings, specs, tmp_path / "s", registry, search="cma", budget=16, seed=0, metric=metric
    )
    assert again.ran == [] and [(r.id, r.score) for r in again.rows] == [(r.id, r.score) for r in sweep.rows]


def test_cma_and_ranges_are_checked_before_anything_runs() -> None:
    ranged, listed = parse_setting("parameters.lambda=0.1:1.5"), parse_setting("parameters.lambda=0.1,1.5")
    with pytest.raises(RecipeError, match="--budget"):
        generate([ranged], "cma", None, 0)
    with pytest.raises(RecipeError, match="range LO:HI for every --set"):
        generate([listed], "cma", 8, 0)
    with pytest.raises(RecipeError, match="searched by --search cma"):
        generate([ranged], "grid", None, 0)
    with pytest.raises(RecipeError, match="LO < HI"):
        parse_setting("parameters.lambda=1.5:0.1")
    assert parse_setting("parameters.lambda=-1e-1:2").bounds == (-0.1, 2.0)


def test_a_recipes_scores_are_listed_in_its_manifest(
    recipe_file: Path, tmp_path: Path, probe_registry: Registry
) -> None:
    """The scores a recipe's evaluators write beside a published output are recorded in its manifest,
    so that ``verify`` vouches for them (and flags nothing unlisted)."""
    from workbench.engine.manifest import Manifest, sha256_file, verify_folder
    from workbench.evaluation.running import RESULTS_FILE

    recipe = parse_recipe(recipe_file.read_text() + "evaluators: [tiny_probe]\n")
    result = run_recipe(recipe, out=tmp_path / "scored", registry=probe_registry)
    scores = result.out_dir / RESULTS_FILE
    assert Manifest.read(result.out_dir).files[RESULTS_FILE].sha256 == sha256_file(scores)
    assert verify_folder(result.out_dir) == []
    scores.write_text("{}\n")
    assert [problem.split(":")[0] for problem in verify_folder(result.out_dir)] == [RESULTS_FILE]
