"""Router (gate) weights from prompts, as mergekit-moe 0.1.5 sets them (``mergekit/moe/router.py``).

Each expert's row of every layer's router is a unit vector pointing where that expert's prompts put the
hidden state, so that a token resembling them scores highest for that expert:

- ``hidden`` / ``hidden_last``: the base model runs every positive prompt (the tokenizer's BOS text
  prepended, as mergekit does); the row of layer *l* is the mean over the prompts of the last token's
  hidden state entering layer *l* (``output_hidden_states[l]``: the residual stream before the layer's
  attention, as mergekit takes it, not the normalised MLP input), minus the same mean over the negative
  prompts, L2-normalised per layer. ``hidden_avg`` averages over the prompt's tokens instead of taking
  the last one.
- ``cheap_embed``: the normalised sum of the prompts' token embeddings (minus the normalised sum for the
  negative prompts, normalised again), the same row for every layer; only the embedding matrix is read.
- ``random``: standard normal rows; ``uniform_random``: U(-1/sqrt(hidden), 1/sqrt(hidden)), as
  ``nn.Linear`` initialises. Both are seeded here (mergekit's are not), so a run can be repeated.

Prompts run one at a time, so no padding token is needed (mergekit pads a batch with the BOS token); a
prompt's hidden states do not depend on the padding of others. The base model is loaded (by
transformers, in ``router_dtype``, bfloat16 by default as in mergekit) only for the hidden modes, and
freed before any tensor is written.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.dtypes import code_from_name, to_torch
from workbench.checkpoint.resolve import split_adapters
from workbench.checkpoint.sidecars import TOKENIZER_FILES
from workbench.errors import CheckpointError, RecipeError, WorkbenchError
from workbench.method import tensor_seed
from workbench.moe.config import HIDDEN_MODES, RANDOM_MODES, Expert, LoadedConfig
from workbench.moe.layout import Input

if TYPE_CHECKING:
    import torch

#: A layer whose gate matrix has a condition number above this routes poorly (mergekit's threshold).
DEGENERATE_CONDITION = 5.0


def gated_experts(loaded: LoadedConfig) -> list[Expert]:
    """The experts that get a router row: the routed ones, then the shared ones when they are gated."""
    config = loaded.config
    shared = config.shared_experts or []
    if shared and (config.gate_mode in RANDOM_MODES or any(e.positive_prompts for e in shared)):
        return [*config.experts, *shared]
    return list(config.experts)


def _label(loaded: LoadedConfig, index: int) -> tuple[str, int]:
    count = len(loaded.config.experts)
    return ("experts", index) if index < count else ("shared_experts", index - count)


def load_tokenizer(base: Input, folder: Path, mode: str) -> Any:
    """The base's tokenizer (transformers), or an error saying why the prompts cannot be tokenized."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{base}: gate_mode {mode} tokenizes the prompts with the base model's tokenizer, but {folder} "
            "has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); add them, or use "
            "gate_mode: random."
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise WorkbenchError(
            f"gate_mode {mode} needs transformers (pip install 'merge-workbench[eval]')."
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises anything from OSError to tokenizers' own errors
        raise CheckpointError(
            f"{base}: the tokenizer in {folder} cannot be loaded ({type(exc).__name__}: {exc})."
        ) from None


def _token_ids(tokenizer: Any, prompt: str, where: str, vocab: int) -> list[int]:
    ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RecipeError(f"{where}: the prompt {prompt!r} has no tokens.")
    if max(ids) >= vocab:
        raise CheckpointError(
            f"{where}: the tokenizer gives token id {max(ids)}, but the base has only {vocab} embeddings."
        )
    return list(ids)


def _unit(x: "torch.Tensor") -> "torch.Tensor":
    return x / x.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def _load_model(base: Input, folder: Path, device: str, dtype: "torch.dtype") -> Any:
    try:
        import transformers
    except ImportError:
        raise WorkbenchError(
            "the hidden gate modes need transformers (pip install 'merge-workbench[eval]')."
        ) from None
    if split_adapters(base.ref)[1]:
        raise RecipeError(
            f"{base}: the hidden gate modes run the base through transformers, which cannot apply the "
            "adapter; merge the adapter into the base first, or use gate_mode cheap_embed or random."
        )
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    transformers.utils.logging.disable_progress_bar()
    try:
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **{key: dtype})
    except Exception as exc:
        raise CheckpointError(
            f"{base}: transformers cannot load {folder} to compute hidden-state gates ({type(exc).__name__}: {exc})."
        ) from None
    finally:
        transformers.utils.logging.enable_progress_bar()
    return model.to(device).eval()


def compute_gates(
    loaded: LoadedConfig,
    base: Input,
    folder: Path,
    *,
    layers: int,
    hidden: int,
    vocab: int,
    device: str = "cpu",
    router_dtype: str = "bfloat16",
    seed: int = 0,
    note: Callable[[str], None] = lambda text: None,
) -> "torch.Tensor":
    """Gate vectors ``[layers, gated experts, hidden]`` in float32 (see the module docstring)."""
    import torch

    mode = loaded.config.gate_mode
    experts = gated_experts(loaded)
    shape = (layers, len(experts), hidden)
    generator = torch.Generator().manual_seed(tensor_seed(seed, f"moe.gates.{mode}"))
    if mode == "random":
        note(f"routers: random normal rows for {len(experts)} experts (seed {seed})")
        return torch.randn(shape, generator=generator)
    if mode == "uniform_random":
        note(f"routers: uniform random rows for {len(experts)} experts (seed {seed})")
        bound = math.sqrt(1.0 / hidden)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    tokenizer = load_tokenizer(base, folder, mode)

    def prompts(index: int, key: str) -> list[tuple[str, list[int]]]:
        group, i = _label(loaded, index)
        return [
            (p, _token_ids(tokenizer, p, loaded.where(group, i, key, j), vocab))
            for j, p in enumerate(getattr(experts[index], key) or [])
        ]

    rows = []
    if mode == "cheap_embed":
        note(f"routers: prompt embeddings (cheap_embed) for {len(experts)} experts")
        embed = base.reader.read("model.embed_tokens.weight").float()

        def embedded(items: list[tuple[str, list[int]]]) -> "torch.Tensor":
            return _unit(sum((embed[ids].sum(dim=0) for _, ids in items), torch.zeros(hidden)))

        for index in range(len(experts)):
            vector = embedded(prompts(index, "positive_prompts"))
            negative = prompts(index, "negative_prompts")
            if negative:
                vector = vector - embedded(negative)
            rows.append(_unit(vector).expand(layers, hidden))
        return torch.stack(rows, dim=1).contiguous()

    assert mode in HIDDEN_MODES
    note(f"routers: loading the base model ({router_dtype}, {device}) to run the prompts")
    held = {"model": _load_model(base, folder, device, to_torch(code_from_name(router_dtype)))}
    last = mode != "hidden_avg"

    def states(items: list[tuple[str, list[int]]]) -> "torch.Tensor":
        total = torch.zeros(layers, hidden)
        for _, ids in items:
            with torch.no_grad():
                output = held["model"](
                    input_ids=torch.tensor([ids], device=device), output_hidden_states=True
                )
            found = output.hidden_states
            if len(found) != layers + 1:
                raise CheckpointError(
                    f"{base}: transformers returned {len(found)} hidden states for {layers} layers."
                )
            entering = torch.stack(found[:-1])[:, 0].float().cpu()  # [layers, tokens, hidden]
            total += entering[:, -1] if last else entering.mean(dim=1)
        return total / len(items)

    try:
        for index, expert in enumerate(experts):
            note(f"routers: {len(expert.positive_prompts or [])} prompt(s) of expert {index}")
            vector = states(prompts(index, "positive_prompts"))
            negative = prompts(index, "negative_prompts")
            if negative:
                vector = vector - states(negative)
            rows.append(_unit(vector))
    finally:
        held.clear()  # the base model is freed before any tensor is written
        gc.collect()
    return torch.stack(rows, dim=1)


def degenerate_layers(gates: "torch.Tensor") -> list[int]:
    """Layers whose gate matrix is ill-conditioned (mergekit warns: prompts too similar)."""
    import torch

    return [
        layer
        for layer in range(gates.shape[0])
        if float(torch.linalg.cond(gates[layer].float())) > DEGENERATE_CONDITION
    ]
