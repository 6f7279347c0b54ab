"""The model zoo, built once per test session at the tiny scale and judged through its evaluators.

Accuracies are computed here through the registered ``zoo_<task>`` evaluators on freshly loaded
folders, not read from the manifest; LoRA adapters are merged here from their files with
W + (alpha / r) * B @ A. The margins held with room to spare for build seeds 0 and 1, and would
fail for an expert that learned nothing (the base scores 0 on every task it was not trained on).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from workbench.errors import OutputError, WorkbenchError
from workbench.evaluator import EvaluationError, LoadedModel, load_model
from workbench.registry import Registry
from workbench.zoo import tasks
from workbench.zoo.build import MANIFEST, build_zoo, plan, run_job
from workbench.zoo.lora import TARGET_MODULES
from workbench.zoo.model import SCALES

transformers = pytest.importorskip("transformers")

N = 256  # held-out examples per score
MARGIN = 0.2  # an expert's accuracy over the base's on its own task


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    manifest = build_zoo(root, "tiny", seed=0)
    return root, manifest


_models: dict[Path, LoadedModel] = {}


def _load(path: Path) -> LoadedModel:
    if path not in _models:
        _models[path] = load_model(path)
    return _models[path]


def _evaluate(registry: Registry, model: LoadedModel, task: str, **options: Any) -> dict[str, float]:
    cls = registry.evaluator(f"zoo_{task}")
    evaluator = cls(cls.Options(**{"n": N, **options}))
    evaluator.check(model)
    return evaluator.evaluate(model)


def _accuracy(registry: Registry, model: LoadedModel, task: str) -> float:
    return _evaluate(registry, model, task)["accuracy"]


def test_zoo_evaluators_are_registered(registry: Registry) -> None:
    missing = sorted(f"zoo_{task}" for task in tasks.TASKS if f"zoo_{task}" not in registry.evaluators)
    assert not missing, f"not registered through the entry point: {missing}"


def test_manifest_and_folders(zoo: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = zoo
    assert json.loads((root / MANIFEST).read_text()) == manifest
    assert manifest["scale"] == "tiny" and manifest["seed"] == 0 and "--scale tiny" in manifest["command"]
    expected = (
        {"base", "math", "language", "ot_a", "ot_b"}
        | {f"experts/{t}" for t in tasks.EXPERT_TASKS}
        | {f"lora/{t}" for t in tasks.LORA_TASKS}
    )
    assert set(manifest["models"]) == expected and len(tasks.EXPERT_TASKS) >= 4
    for name, entry in manifest["models"].items():
        assert set(entry["accuracy"]) == set(tasks.TASKS) == set(entry["loss"])
        folder = root / entry["path"]
        files = (
            {"adapter_config.json", "adapter_model.safetensors"}
            if name.startswith("lora/")
            else {"config.json", "model.safetensors", "tokenizer.json"}
        )
        assert files <= {p.name for p in folder.iterdir()}, name
    config = json.loads((root / "base" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == tasks.VOCAB_SIZE
    assert config["num_hidden_layers"] == SCALES["tiny"].num_hidden_layers >= 3


def test_saved_tokenizer_matches_the_task_ids(zoo: tuple[Path, dict[str, Any]]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo[0] / "math")
    prompt, answer = tasks.TASKS["math_b"].examples(1, seed=3)[0]
    text = tasks.decode(prompt[1:] + answer[:-1])
    assert tokenizer(text)["input_ids"] == prompt + answer[:-1]  # <bos> is prepended, as in training
    assert tokenizer.decode(answer[:-1]) == tasks.decode(answer[:-1])
    assert len(tokenizer) == tasks.VOCAB_SIZE


@pytest.mark.parametrize("task", [*tasks.EXPERT_TASKS, "math"])
def test_every_expert_beats_the_base_on_its_task(
    zoo: tuple[Path, dict[str, Any]], registry: Registry, task: str
) -> None:
    root, manifest = zoo
    expert_path = root / ("math" if task == "math" else f"experts/{task}")
    base = _accuracy(registry, _load(root / "base"), task)
    expert = _accuracy(registry, _load(expert_path), task)
    assert expert >= base + MARGIN, f"{task}: expert {expert:.3f} vs base {base:.3f}"
    # The manifest reports the held-out score on its first eval_examples (batching may differ).
    reported = manifest["models"][str(expert_path.relative_to(root))]["accuracy"][task]
    cls = registry.evaluator(f"zoo_{task}")
    measured = cls(cls.Options(n=manifest["eval_examples"])).evaluate(_load(expert_path))["accuracy"]
    assert reported == pytest.approx(measured, abs=2 / manifest["eval_examples"])
    # Experts stay language models: replay during fine-tuning keeps generic text close to the base.
    base_text = _evaluate(registry, _load(root / "base"), "text_a")["loss"]
    assert _evaluate(registry, _load(expert_path), "text_a")["loss"] < base_text + 0.5


def test_math_expert_is_poor_at_arithmetic_in_language_b(
    zoo: tuple[Path, dict[str, Any]], registry: Registry
) -> None:
    math = _load(zoo[0] / "math")
    in_a, in_b = _accuracy(registry, math, "math"), _accuracy(registry, math, "math_b")
    assert in_b <= 0.25 * in_a and in_a - in_b >= MARGIN, (in_a, in_b)
    # The same problems: math_b is math ciphered word by word.
    pairs = zip(tasks.TASKS["math"].examples(20), tasks.TASKS["math_b"].examples(20))
    assert all((tasks.to_b(pa), tasks.to_b(aa)) == (pb, ab) for (pa, aa), (pb, ab) in pairs)


def test_language_expert_improves_text_in_language_b(
    zoo: tuple[Path, dict[str, Any]], registry: Registry
) -> None:
    root = zoo[0]
    base = _evaluate(registry, _load(root / "base"), "text_b")
    language = _evaluate(registry, _load(root / "language"), "text_b")
    assert language["loss"] < base["loss"] - 0.03, (base, language)
    assert language["accuracy"] > base["accuracy"]
    # The base reads both languages decently: far better than guessing among the words.
    base_a = _evaluate(registry, _load(root / "base"), "text_a")
    uniform = torch.log(torch.tensor(float(len(tasks.WORDS_A)))).item()
    assert base["loss"] < 0.6 * uniform and base_a["loss"] < 0.6 * uniform


def test_ot_models_differ_but_both_solve_their_task(
    zoo: tuple[Path, dict[str, Any]], registry: Registry
) -> None:
    root, manifest = zoo
    task = manifest["ot"]["task"]
    a, b = (_load(root / name).module for name in manifest["ot"]["models"])
    assert a.config.to_dict()["hidden_size"] == b.config.to_dict()["hidden_size"]
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        if wa.dim() == 2:  # independent initialisations: unrelated matrices, not small perturbations
            cosine = torch.nn.functional.cosine_similarity(wa.flatten(), wb.flatten(), dim=0)
            assert abs(float(cosine)) < 0.3, name
    base = _accuracy(registry, _load(root / "base"), task)
    for name in manifest["ot"]["models"]:
        assert _accuracy(registry, _load(root / name), task) >= max(0.5, base + MARGIN), name


@pytest.mark.parametrize("task", tasks.LORA_TASKS)
def test_lora_adapter_is_peft_format_and_merging_it_helps(
    zoo: tuple[Path, dict[str, Any]], registry: Registry, task: str
) -> None:
    root = zoo[0]
    folder = root / "lora" / task
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES)
    assert Path(config["base_model_name_or_path"]) == (root / "base").resolve()
    r, alpha = config["r"], config["lora_alpha"]
    base = _load(root / "base")
    merged = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    weights = dict(merged.named_parameters())
    layers = base.module.config.num_hidden_layers
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert len(keys) == 2 * layers * len(TARGET_MODULES)
        with torch.no_grad():
            for layer in range(layers):
                for module in TARGET_MODULES:
                    part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                    path = f"model.layers.{layer}.{part}.{module}"
                    lora_a = f.get_tensor(f"base_model.model.{path}.lora_A.weight")
                    lora_b = f.get_tensor(f"base_model.model.{path}.lora_B.weight")
                    weight = weights[f"{path}.weight"]
                    assert lora_a.shape == (r, weight.shape[1]) and lora_b.shape == (weight.shape[0], r)
                    weight += (alpha / r) * (lora_b @ lora_a)
    merged_model = LoadedModel(module=merged, config=merged.config.to_dict(), path=folder)
    before, after = _evaluate(registry, base, task), _evaluate(registry, merged_model, task)
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["accuracy"] >= before["accuracy"] + MARGIN / 2, (before, after)


def test_evaluators_are_deterministic_and_serve_validation_batches(
    zoo: tuple[Path, dict[str, Any]], registry: Registry
) -> None:
    model = _load(zoo[0] / "experts" / "sort")
    first = _evaluate(registry, model, "sort", seed=7)
    assert _evaluate(registry, model, "sort", seed=7) == first
    assert _evaluate(registry, _load(zoo[0] / "experts" / "sort"), "sort", seed=7, batch_size=32)[
        "accuracy"
    ] == pytest.approx(first["accuracy"], abs=2 / N)
    cls = registry.evaluator("zoo_sort")
    batches = list(cls(cls.Options(batch_size=8)).batches(3, seed=1))
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 8 for b in batches)
    again = list(cls(cls.Options(batch_size=8)).batches(3, seed=1))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    for batch in batches:
        supervised = batch["labels"] != -100
        assert torch.equal(batch["labels"][supervised], batch["input_ids"][supervised])
        assert not supervised[:, :2].any()  # <bos> and the task tag are prompt
        assert int(batch["labels"][supervised][-1]) == tasks.EOS
    # Held out by content: no test or validation example occurs in the training stream.
    train = {tuple(p + a) for p, a in tasks.TASKS["sort"].examples(3000, seed=0, split="train")}
    assert not train & {tuple(p + a) for p, a in tasks.TASKS["sort"].examples(300, seed=0, split="test")}
    assert not train & {
        tuple(b["input_ids"][i][b["attention_mask"][i] == 1].tolist()) for b in batches for i in range(8)
    }


def test_training_is_deterministic(zoo: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Re-running one job of the build gives the same weights, bit for bit."""
    root, _ = zoo
    shutil.copytree(root / "base", tmp_path / "base")
    job = next(j for j in plan(SCALES["tiny"], 0) if j["name"] == "language")
    run_job(job, str(tmp_path), "tiny")
    with (
        safe_open(str(root / "language" / "model.safetensors"), "pt") as built,
        safe_open(str(tmp_path / "language" / "model.safetensors"), "pt") as again,
    ):
        assert set(built.keys()) == set(again.keys())
        for key in built.keys():
            assert torch.equal(built.get_tensor(key), again.get_tensor(key)), key


def test_wrong_vocabulary_is_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "other-vocab")
    model = load_model(tmp_path / "other-vocab")
    evaluator = registry.evaluator("zoo_subject")()
    with pytest.raises(EvaluationError) as info:
        evaluator.check(model)
    message = str(info.value)
    assert "other-vocab" in message and str(tasks.VOCAB_SIZE) in message and "200" in message


def test_wrong_architecture_is_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=tasks.VOCAB_SIZE, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2-like")
    model = load_model(tmp_path / "gpt2-like")
    with pytest.raises(EvaluationError) as info:
        registry.evaluator("zoo_math")().check(model)
    message = str(info.value)
    assert (
        "gpt2-like" in message
        and "LlamaForCausalLM" in message
        and "gpt2" in message
        and "GPT2LMHeadModel" in message
    )


def test_wrong_tokenizer_is_a_clear_error(zoo: tuple[Path, dict[str, Any]], registry: Registry) -> None:
    from tokenizers import Tokenizer, models

    base = _load(zoo[0] / "base")
    vocab = dict(tasks.TOKEN_ID)
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    other = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    )
    with pytest.raises(EvaluationError, match="tokenizer does not match"):
        registry.evaluator("zoo_subject")().check(
            LoadedModel(module=base.module, config=base.config, path=base.path, tokenizer=other)
        )


def test_build_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not an empty folder"):
        build_zoo(tmp_path / "taken", "tiny")
    with pytest.raises(WorkbenchError, match="unknown zoo scale 'huge'"):
        build_zoo(tmp_path / "new", "huge")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me" and not (tmp_path / "new").exists()


def test_zoo_report_scores_every_row_and_reproduces_the_experts(
    zoo: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """`workbench zoo report` on the tiny zoo: every method row present, experts scored as the evaluators say."""
    from click.testing import CliRunner

    from workbench.cli.main import main
    from workbench.evaluation.running import evaluate, make_evaluators
    from workbench.recipe.schema import EvaluatorSpec
    from workbench.registry import get_registry
    from workbench.zoo.reports.task_vectors import METHODS

    root, manifest = zoo
    out = tmp_path / "reproductions.md"
    # lora_experts trains MoLA three times: tested below with fewer steps
    sections = "task_vectors,layer_swap,ot_fusion"
    result = CliRunner().invoke(
        main,
        ["zoo", "report", str(root), "--out", str(out), "--n", "32", "--seed", "7", "--sections", sections],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "## Layer-wise LoRA experts" not in text
    for method in METHODS:
        assert sum(line.startswith(f"| {method.label} |") for line in text.splitlines()) == 1 + len(
            method.grid
        ), method.label
    task = next(iter(manifest["experts"]))
    [evaluator] = make_evaluators(
        [EvaluatorSpec(name=f"zoo_{task}", options={"n": 32, "seed": 7})], get_registry()
    )
    accuracy = evaluate(root / manifest["experts"][task], [evaluator])[f"zoo_{task}"]["accuracy"]
    row = next(line for line in text.splitlines() if line.startswith(f"| expert: {task} |"))
    assert f"{accuracy:.3f}" == row.split("|")[2].strip()
    # The layer-swapping table: the math expert's arithmetic in A, as its evaluator scores it.
    assert (
        "## Layer swapping: arithmetic posed in language B" in text
        and "| layer swap, bottom 1, top 1 |" in text
    )
    [math] = make_evaluators([EvaluatorSpec(name="zoo_math", options={"n": 32, "seed": 7})], get_registry())
    math_accuracy = evaluate(root / manifest["math"], [math])["zoo_math"]["accuracy"]
    row = next(line for line in text.splitlines() if line.startswith("| math expert |"))
    assert row.split("|")[2].split(" / ")[1].strip() == f"{math_accuracy:.3f}"
    # The OT-fusion table: every fusion row, and parent 1 scored as its evaluator scores it.
    from workbench.zoo.reports.ot_fusion import FUSIONS

    assert all(
        text.count(f"| {label} |") == 2 for label in FUSIONS
    )  # one shot, then after the short fine-tune
    assert "### After 10 fine-tuning steps" in text
    ot_task, ot_parent = manifest["ot"]["task"], manifest["ot"]["models"][0]
    [ot] = make_evaluators(
        [EvaluatorSpec(name=f"zoo_{ot_task}", options={"n": 32, "seed": 7})], get_registry()
    )
    scores = evaluate(root / ot_parent, [ot])[f"zoo_{ot_task}"]
    row = next(line for line in text.splitlines() if line.startswith(f"| parent 1 ({ot_parent}) |"))
    assert row.split("|")[2].strip() == f"{scores['accuracy']:.3f} / {scores['token_accuracy']:.3f}"


def test_zoo_report_chooses_each_value_on_validation(
    zoo: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The reported value is the grid point with the best validation score, and its test score is the one printed."""
    from workbench.registry import get_registry
    from workbench.zoo.reports.report import write_report
    from workbench.zoo.reports.task_vectors import GridMethod

    root, manifest = zoo
    method = GridMethod(
        "scaled sum",
        "λ",
        (0.0, 0.5),
        lambda ex, v: {"method": "task_arithmetic", "models": ex, "parameters": {"lambda": v}},
    )
    text = write_report(
        [root, root],
        tmp_path / "r.md",
        get_registry(),
        32,
        3,
        "cmd",
        log=lambda _: None,
        methods=(method,),
        sections=("task_vectors",),
    )
    grid = {}
    for line in text.splitlines():
        if line.startswith("| scaled sum | λ = "):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            validation, test = (float(x) for x in cells[2].split(" / "))
            assert cells[3] == cells[2]  # the same zoo twice gives the same scores
            grid[float(cells[1].removeprefix("λ = "))] = (validation, test)
    assert set(grid) == {0.0, 0.5}
    assert grid[0.0] == (0.0, 0.0)  # λ = 0 is the base, which solves no task
    best = max(grid, key=lambda v: (grid[v][0], -v))
    [comparison] = [line for line in text.splitlines() if line.startswith("| scaled sum | λ ∈")]
    assert f"{grid[best][1]:.3f} (λ = {best})" in comparison
    assert comparison.rstrip(" |").endswith(f"{grid[best][1]:.3f} ± 0.000")


def test_zoo_report_refuses_a_folder_that_is_not_a_zoo(
    zoo: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from workbench.cli.main import main

    out = tmp_path / "r.md"
    result = CliRunner().invoke(main, ["zoo", "report", str(zoo[0]), str(tmp_path), "--out", str(out)])
    assert result.exit_code != 0 and f"{tmp_path} is not a zoo (no zoo.json)" in result.output
    assert not out.exists()


def test_mola_section_scores_every_row(zoo: tuple[Path, dict[str, Any]], registry: Registry) -> None:
    from workbench.evaluation.running import evaluate, make_evaluators
    from workbench.recipe.schema import EvaluatorSpec
    from workbench.zoo.reports.mola import ALLOCATIONS, measure_mola, render_mola

    root, manifest = zoo
    result = measure_mola(root, registry, n=16, seed=7, log=lambda _: None, steps=3)
    assert set(result.tasks) == set(manifest["lora"])
    assert len(result.rows) == 1 + len(result.tasks) + 2 + len(ALLOCATIONS)
    task = result.tasks[0]
    [evaluator] = make_evaluators([EvaluatorSpec(name=f"zoo_{task}", options={"n": 16, "seed": 7})], registry)
    adapted = f"{root / 'base'}+{root / manifest['lora'][task]}"
    assert result.rows[f"LoRA {task}"][task] == evaluate(adapted, [evaluator])[f"zoo_{task}"]["accuracy"]
    mola = [label for label in result.rows if label.startswith("MoLA")]
    assert len({result.parameters[label] for label in mola}) == 1  # equal expert counts, equal parameters
    lines = render_mola([result], "note")
    assert sum(line.startswith("| MoLA ") for line in lines) == len(ALLOCATIONS)


def test_mola_train_cli_writes_a_folder_that_evaluates(
    zoo: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from workbench.cli.main import main

    root, _ = zoo
    out = tmp_path / "mola"
    result = CliRunner().invoke(
        main,
        [
            "lora",
            "mola-train",
            str(root / "base"),
            "-e",
            "zoo_subject",
            "-e",
            "zoo_count",
            "-o",
            "batch_size=8",
            "-a",
            "1-2",
            "--steps",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "mola" / "mola_config.json").read_text())
    assert config["allocation"]["per_layer"] == [1, 1, 2, 2] and config["steps"] == 4
    result = CliRunner().invoke(main, ["eval", str(out), "-e", "zoo_subject", "-o", "n=8"])
    assert result.exit_code == 0, result.output
    assert "zoo_subject" in result.output and "accuracy" in result.output


def test_learned_coefficients_section_scores_every_row(
    zoo: tuple[Path, dict[str, Any]], registry: Registry
) -> None:
    from workbench.zoo.reports.atlas import GRID_METHODS, SHARES, measure_learned, render_learned
    from workbench.zoo.reports.common import ZooScorer
    from workbench.zoo.reports.task_vectors import GridMethod

    root, _ = zoo
    one_value = tuple(
        GridMethod(m.label, m.knob, (0.5,), m.recipe) for m in GRID_METHODS
    )  # one merge per baseline
    scorer = ZooScorer(root, registry, 16, 7)
    result = measure_learned(scorer, n=16, seed=7, log=lambda _: None, steps=2, baselines=one_value)
    labels = list(result.rows)
    assert len(labels) == len(GRID_METHODS) + 2 + len(SHARES)
    assert labels[0] == "task arithmetic, λ chosen on validation" and result.values[labels[0]] == "λ = 0.5"
    assert result.rows[labels[0]] is result.zoo.grid["task arithmetic"][0.5]
    assert result.values[labels[3]] == "from 0.5"
    assert labels[4].endswith("1% of validation (1 per task)") and labels[-1].endswith(
        "100% of validation (16 per task)"
    )
    assert all(set(scored.test) == set(scorer.tasks) for scored in result.rows.values())
    other = copy.deepcopy(result)  # another zoo, where task arithmetic chose another λ: rows still line up
    other.values[labels[0]] = "λ = 0.7"
    lines = render_learned([result, other], 16)
    assert sum(line.startswith("| aTLAS") for line in lines) == 2 * len(
        SHARES
    )  # the comparison and the per-task table
    assert any(
        line.startswith("| task arithmetic, λ chosen on validation | ")
        and "(λ = 0.5) | " in line
        and "(λ = 0.7) | " in line
        for line in lines
    )
