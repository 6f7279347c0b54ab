"""Evaluators for the model zoo's synthetic tasks: ``zoo_<task>`` for every task of the zoo.

Each scores a zoo model (or any merge of zoo models) on held-out generated examples: exact match
of the answer for the exact tasks, next-word accuracy for text. Held-out means disjoint from every
training example by content, whatever the seed; ``batches`` serves the validation split, so
data-driven methods never see the examples they are scored on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar, Literal, cast

from workbench.evaluator import Evaluator, EvaluatorOptions, LoadedModel
from workbench.hookspecs import hookimpl
from workbench.method import Param
from workbench.zoo.tasks import TASKS, check_compatible, collate, score

if TYPE_CHECKING:
    import torch


class ZooOptions(EvaluatorOptions):
    n: int = Param(
        256, description="Number of held-out examples to score.", per_layer=False, ge=1, le=100_000
    )
    seed: int = Param(
        0,
        description="Which held-out examples; every seed draws from the chosen split, which no model was trained on.",
        per_layer=False,
        ge=0,
    )
    split: Literal["test", "validation"] = Param(
        "test",
        description=(
            "Held-out split scored: 'validation' for choosing hyperparameters, 'test' for the figures reported."
        ),
        per_layer=False,
    )
    batch_size: int = Param(
        64,
        description="Examples per forward pass (and per batch served to data-driven methods).",
        per_layer=False,
        ge=1,
    )


class ZooEvaluator(Evaluator):
    """Base class of the ``zoo_<task>`` evaluators; subclasses set ``task``."""

    task: ClassVar[str]
    Options = ZooOptions

    def check(self, model: LoadedModel) -> None:
        check_compatible(model)

    def evaluate(self, model: LoadedModel) -> dict[str, float | str]:
        options = cast(ZooOptions, self.options)
        scores = score(model.module, self.task, options.n, options.seed, options.batch_size, options.split)
        return {
            "accuracy": scores["accuracy"],
            "token_accuracy": scores["token_accuracy"],
            "loss": scores["loss"],
        }

    def batches(self, count: int, seed: int) -> Iterator[dict[str, "torch.Tensor"]]:
        options = cast(ZooOptions, self.options)
        examples = TASKS[self.task].examples(count * options.batch_size, seed, split="validation")
        for start in range(0, len(examples), options.batch_size):
            yield collate(examples[start : start + options.batch_size])


def _evaluator(task: str) -> type[ZooEvaluator]:
    spec = TASKS[task]
    metric = "exact match of the answer" if spec.exact else "next-word accuracy"
    summary = f"Zoo task '{task}': {spec.summary}; {metric} on held-out examples (and their loss)."
    class_name = "Zoo" + "".join(part.capitalize() for part in task.split("_"))
    return type(
        class_name,
        (ZooEvaluator,),
        {"name": f"zoo_{task}", "summary": summary, "task": task, "__module__": __name__},
    )


EVALUATORS: dict[str, type[ZooEvaluator]] = {task: _evaluator(task) for task in TASKS}


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    for evaluator in EVALUATORS.values():
        register(evaluator)
