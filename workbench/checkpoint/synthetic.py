"""Llama-shaped checkpoints generated here, for demos, benchmarks and tests (nothing is downloaded).

A "fine-tune" is its base plus a small deterministic perturbation, so task vectors are small
relative to the weights, as in real fine-tunes. Every tensor is generated from a seed derived from
its name and written straight to disk, so even the ~250M-parameter size needs little memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.checkpoint.base import TensorSpec
from workbench.checkpoint.dtypes import code_from_name
from workbench.checkpoint.folder import plan_shards, write_index
from workbench.checkpoint.safetensors_io import StreamingFileWriter

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            names += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        names += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return names

    def parameter_count(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config(self, dtype: str) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


SIZES = {
    "tiny": LlamaShape(64, 176, 4, 4, 2, 256),
    "small": LlamaShape(256, 704, 8, 8, 4, 4096),
    # 60m: issue 27's mid-size parity models (56M parameters: big enough for real vocabularies and
    # multi-block tensors, small enough to merge through mergekit in seconds).
    "60m": LlamaShape(512, 1408, 8, 8, 4, 32000),
    # 230m: the model size of issue 9's mergekit anchor (three fine-tunes + base = 1.8 GB of bf16).
    "230m": LlamaShape(1024, 2816, 14, 16, 8, 32000),
    "250m": LlamaShape(1024, 2816, 16, 16, 8, 32000),
    "1b": LlamaShape(2048, 5632, 20, 32, 8, 32000),
}


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (
        2**62 - 1
    )


def _tensor(name: str, shape: tuple[int, ...], seed: int, variant: int, delta: float) -> "torch.Tensor":
    import torch

    gen = torch.Generator().manual_seed(_seed(seed, name))
    if name.endswith("norm.weight"):
        value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        value = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
    if variant:
        noise = torch.Generator().manual_seed(_seed(seed, name, variant))
        value += torch.randn(shape, generator=noise) * (
            delta * float(value.std()) if value.numel() > 1 else delta
        )
    return value


def write_model(
    directory: Path,
    shape: LlamaShape,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    variant: int = 0,
    delta: float = 0.02,
    shard_size: int = 2 * 10**9,
) -> Path:
    """Write a base model (``variant=0``) or its fine-tune number ``variant`` into ``directory``."""
    from workbench.checkpoint.dtypes import to_torch

    directory.mkdir(parents=True, exist_ok=True)
    code = code_from_name(dtype)
    specs = [TensorSpec(name, code, dims) for name, dims in shape.tensors()]
    files = plan_shards(specs, shard_size)
    for file in files:
        writer = StreamingFileWriter(directory / file.name, file.tensors)
        try:
            for spec in file.tensors:
                writer.write(
                    spec.name, _tensor(spec.name, spec.shape, seed, variant, delta).to(to_torch(code))
                )
        finally:
            writer.close()
    write_index(directory, files)
    (directory / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    return directory


def write_family(
    directory: Path,
    size: str | LlamaShape = "tiny",
    fine_tunes: int = 2,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> list[Path]:
    """A base model and ``fine_tunes`` fine-tunes of it: ``directory/base``, ``directory/ft1``, ...
    (``size``: a name of :data:`SIZES` or a shape)."""
    shape = size if isinstance(size, LlamaShape) else SIZES[size]
    paths = [write_model(directory / "base", shape, dtype=dtype, seed=seed)]
    for variant in range(1, fine_tunes + 1):
        paths.append(write_model(directory / f"ft{variant}", shape, dtype=dtype, seed=seed, variant=variant))
    return paths
