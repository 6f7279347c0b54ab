"""The demo: tiny Llama-shaped models generated here, merged by every recipe in ``recipes/``.

The example recipes name their inputs relative to the current folder, where the demo generates
them (``write_demo_inputs``):

- ``demo/models/{base,ft1,ft2}``: a tiny base and two fine-tunes of it (``workbench.checkpoint.synthetic``),
  each with a byte-level tokenizer (256 tokens, the tiny models' vocabulary), so that recipes can
  read text data with ``{text: FILE, seq_len: N}``;
- ``demo/models/lora/{ft1,ft2}``: rank-8 LoRA adapters extracted from the fine-tunes
  (``workbench lora extract``), for ``lora_experts``;
- ``demo/models/data/{prose,arithmetic}.txt``: two small texts, the "tasks" of ft1 and ft2, for the
  methods that learn from data (``atlas``) or route by prompts (``lora_experts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_DIR = Path("demo")
#: The example recipes of a source checkout (not installed with the package).
CHECKOUT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
#: Rank of the demo's LoRA adapters.
LORA_RANK = 8

_PROSE = (
    "The river runs past the old mill and under the stone bridge before it reaches the sea. "
    "In spring the water is high and brown; in late summer it is slow and clear, and children "
    "wade across to the island where the herons stand. The miller kept a small boat tied to "
    "the bank, and on quiet evenings he rowed out to watch the swallows skim the surface. "
)


def _prose() -> str:
    return "".join(_PROSE for _ in range(6))


def _arithmetic() -> str:
    lines = []
    for a in range(10):
        for b in range(10):
            lines.append(f"{a} + {b} = {a + b}\n" if (a + b) % 2 == 0 else f"{a + b} - {b} = {a}\n")
    return "".join(lines)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with exactly 256 tokens (one per byte), no special tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def write_demo_inputs(models: Path | None = None) -> dict[str, Path]:
    """Generate everything the example recipes read, under ``models`` (default ``demo/models``).

    Returns the paths by name: ``base``, ``ft1``, ``ft2``, ``lora/ft1``, ``lora/ft2``,
    ``data/prose.txt``, ``data/arithmetic.txt``.
    """
    from workbench.checkpoint.synthetic import write_family
    from workbench.lora.extract import extract_lora
    from workbench.registry import get_registry

    models = DEMO_DIR / "models" if models is None else models
    paths = {p.name: p for p in write_family(models, "tiny", fine_tunes=2)}
    tokenizer = byte_tokenizer()
    for path in paths.values():
        tokenizer.save_pretrained(path)
    data = models / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, text in (("prose.txt", _prose()), ("arithmetic.txt", _arithmetic())):
        (data / name).write_text(text)
        paths[f"data/{name}"] = data / name
    registry = get_registry()
    for tuned in ("ft1", "ft2"):
        out = models / "lora" / tuned
        extract_lora(str(paths["base"]), str(paths[tuned]), out, LORA_RANK, registry, overwrite=True)
        paths[f"lora/{tuned}"] = out
    return paths


def run_demo(recipes: Path, console: Any) -> list[Path]:
    """Generate ``demo/models`` and run every recipe into ``demo/out/<recipe name>``."""
    from workbench.engine.run import run_recipe
    from workbench.errors import RecipeError

    if recipes == Path("recipes") and not recipes.is_dir() and CHECKOUT_RECIPES.is_dir():
        recipes = CHECKOUT_RECIPES  # the default, run from another folder: the checkout's examples
        console.print(f"running the example recipes in {recipes}/")
    recipe_files = sorted(recipes.glob("*.yaml")) + sorted(recipes.glob("*.yml"))
    if not recipe_files:
        raise RecipeError(f"no recipes (*.yaml) in {recipes}.")
    models = DEMO_DIR / "models"
    write_demo_inputs(models)
    console.print(
        f"generated tiny models in {models}/ (base, ft1, ft2, LoRA adapters lora/ft1 and lora/ft2, texts in data/)"
    )
    outputs = []
    for recipe in recipe_files:
        out = DEMO_DIR / "out" / recipe.stem
        result = run_recipe(recipe, out=out, overwrite=True)
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        console.print(f"[green]ok[/] {recipe.name}: {result.tensors} tensors -> {out}/")
        outputs.append(out)
    return outputs
