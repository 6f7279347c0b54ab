"""Evaluators for any causal language model with a tokenizer: perplexity on a text file, and a
greedy-generation check. With ``workbench eval smollm2`` they judge the real SmolLM2-135M."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from workbench.evaluator import EvaluationError, Evaluator, EvaluatorOptions, LoadedModel
from workbench.hookspecs import hookimpl
from workbench.method import Param


def _require_tokenizer(evaluator: Evaluator, model: LoadedModel) -> None:
    if model.tokenizer is None:
        raise EvaluationError(f"evaluator '{evaluator.name}' needs a tokenizer, and {model.label} has none.")
    vocab = getattr(model.module.config, "vocab_size", None)
    if vocab is not None and len(model.tokenizer) > vocab:
        raise EvaluationError(
            f"{model.label}: its tokenizer has {len(model.tokenizer)} tokens but the model's vocabulary holds {vocab};"
            " they do not belong together."
        )


class PerplexityOptions(EvaluatorOptions):
    text: str = Param(..., description="Path of a UTF-8 text file to score.", per_layer=False)
    max_tokens: int = Param(
        2048, description="Score at most this many tokens of the file.", per_layer=False, ge=2
    )
    window: int = Param(
        512, description="Tokens per forward pass (non-overlapping windows).", per_layer=False, ge=2
    )


class Perplexity(Evaluator):
    name = "perplexity"
    summary = "Perplexity of the model on a text file (exp of the mean next-token loss)."
    Options = PerplexityOptions

    def check(self, model: LoadedModel) -> None:
        _require_tokenizer(self, model)
        if not Path(self.options.text).is_file():
            raise EvaluationError(f"evaluator 'perplexity': text file {self.options.text} does not exist.")

    def evaluate(self, model: LoadedModel) -> dict[str, float | str]:
        import torch

        text = Path(self.options.text).read_text(encoding="utf-8")
        ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][
            : self.options.max_tokens
        ]
        if ids.numel() < 2:
            raise EvaluationError(f"evaluator 'perplexity': {self.options.text} holds fewer than 2 tokens.")
        total_loss, counted = 0.0, 0
        with torch.no_grad():
            for start in range(0, ids.numel() - 1, self.options.window):
                chunk = ids[start : start + self.options.window + 1].unsqueeze(0)
                if chunk.shape[1] < 2:
                    break
                logits = model.module(input_ids=chunk[:, :-1]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
                total_loss += float(loss)
                counted += chunk.shape[1] - 1
        return {"perplexity": math.exp(total_loss / counted), "tokens": float(counted)}


class GenerationOptions(EvaluatorOptions):
    prompt: str = Param(
        "The capital of France is", description="Prompt to complete greedily.", per_layer=False
    )
    expect: str = Param("Paris", description="Text the completion should contain.", per_layer=False)
    max_new_tokens: int = Param(8, description="Tokens to generate.", per_layer=False, ge=1, le=512)


class GenerationCheck(Evaluator):
    name = "generation_check"
    summary = "Greedy completion of a prompt; scores 1 if it contains the expected text."
    Options = GenerationOptions

    def check(self, model: LoadedModel) -> None:
        _require_tokenizer(self, model)

    def evaluate(self, model: LoadedModel) -> dict[str, float | str]:
        import torch

        inputs = model.tokenizer(self.options.prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.module.generate(
                **inputs,
                max_new_tokens=self.options.max_new_tokens,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id or model.tokenizer.eos_token_id,
            )
        completion = model.tokenizer.decode(
            output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return {"contains_expected": float(self.options.expect in completion), "completion": completion}


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    register(Perplexity)
    register(GenerationCheck)
