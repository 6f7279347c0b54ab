"""The zoo's architecture and training budgets per scale, and how a zoo model is saved.

Every zoo model is a plain ``LlamaForCausalLM`` over the zoo vocabulary, saved as a Hugging Face
folder with safetensors weights and a word-level tokenizer, so every tool (transformers, the
workbench's readers, mergekit) opens it like any other checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from workbench.zoo.tasks import BOS, EOS, PAD, TOKEN_ID, UNK, VOCAB, VOCAB_SIZE

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Scale:
    """Model shape and training budget (optimizer steps of ``batch_size`` sequences)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    expert_steps: int
    expert_lr: float
    math_steps: int
    language_steps: int
    language_lr: float
    ot_steps: int
    lora_steps: int
    lora_lr: float
    lora_rank: int
    #: Held-out examples per task for the accuracies written to ``zoo.json``.
    eval_examples: int


SCALES: dict[str, Scale] = {
    "tiny": Scale(
        "tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        batch_size=16,
        pretrain_steps=650,
        pretrain_lr=3e-3,
        expert_steps=300,
        expert_lr=3e-3,
        math_steps=300,
        language_steps=120,
        language_lr=1e-3,
        ot_steps=400,
        lora_steps=320,
        lora_lr=5e-3,
        lora_rank=8,
        eval_examples=128,
    ),
    "small": Scale(
        "small",
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=6,
        num_attention_heads=4,
        batch_size=32,
        pretrain_steps=2000,
        pretrain_lr=2e-3,
        expert_steps=500,
        expert_lr=2e-3,
        math_steps=800,
        language_steps=300,
        language_lr=5e-4,
        ot_steps=1000,
        lora_steps=500,
        lora_lr=3e-3,
        lora_rank=8,
        eval_examples=512,
    ),
}


def llama_config(scale: Scale) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=scale.hidden_size,
        intermediate_size=scale.intermediate_size,
        num_hidden_layers=scale.num_hidden_layers,
        num_attention_heads=scale.num_attention_heads,
        num_key_value_heads=scale.num_attention_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        architectures=["LlamaForCausalLM"],
    )


def new_model(scale: Scale, seed: int) -> "torch.nn.Module":
    """A freshly initialised model; the seed fixes every weight."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(scale))
    return model.float()


def load(path: Path) -> "torch.nn.Module":
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def make_tokenizer() -> Any:
    """A word-level tokenizer over the zoo vocabulary that prepends ``<bos>``, as training did."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(TOKEN_ID), unk_token=VOCAB[UNK]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{VOCAB[BOS]} $A", special_tokens=[(VOCAB[BOS], BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=VOCAB[BOS],
        eos_token=VOCAB[EOS],
        pad_token=VOCAB[PAD],
        unk_token=VOCAB[UNK],
    )


def save(model: "torch.nn.Module", directory: Path) -> Path:
    """Write ``model`` as a Hugging Face folder: config, safetensors weights and the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    cast(Any, model).save_pretrained(directory, safe_serialization=True)  # a transformers model
    make_tokenizer().save_pretrained(directory)
    return directory
