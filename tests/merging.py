"""Helpers shared by the method tests: run a recipe and read every output tensor back, and the float64
expectations they are compared with (independent of the code under test)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from workbench.engine.run import run_recipe
from workbench.recipe.schema import parse_recipe

BF16_HALF_ULP = 2.0**-8  # relative rounding error of round-to-nearest bfloat16
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def q(path: Path | str) -> str:
    """A path quoted for a YAML recipe."""
    return json.dumps(str(path))


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or shards), read with safetensors (independent of the
    project's reader)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    assert files, f"no safetensors file in {directory}"
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_file(file)
        assert not set(part) & set(tensors), "a tensor is stored in two shards"
        tensors.update(part)
    assert tensors, f"no tensors in {directory}"
    return tensors


def merge(tmp_path: Path, text: str, name: str = "out") -> dict[str, torch.Tensor]:
    """Run recipe ``text`` into ``tmp_path/name`` and return the output tensors."""
    out = tmp_path / name
    result = run_recipe(parse_recipe(text), out=out)
    assert result.out_dir == out
    return load_dir(out)


def layer_t(name: str, layers: int) -> float:
    """mergekit's position of a tensor: layer i of n at i/(n-1); tensors outside the layers at 0."""
    m = LAYER.match(name)
    return int(m[1]) / (layers - 1) if m else 0.0


def gradient(anchors: list[float], t: float) -> float:
    """Anchors spread evenly over [0, 1], linearly interpolated."""
    return float(np.interp(t, np.linspace(0.0, 1.0, len(anchors)), anchors))


def combo(tensors: list[torch.Tensor], coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum c_i x_i in float64 and its error scale sum |c_i| |x_i|."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    magnitude = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for x, c in zip(tensors, coefficients):
        total += c * x.double()
        magnitude += abs(c) * x.double().abs()
    return total, magnitude


def slerp_reference(
    t: float, v0: torch.Tensor, v1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, str, float]:
    """methods.md 8.5, in float64: (result, error scale, branch, cos)."""
    a, b = v0.double(), v1.double()
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    d = float((ua * ub).sum())
    if abs(d) > 0.9995:
        c0, c1, branch = 1.0 - t, t, "lerp"
    else:
        omega = math.acos(max(-1.0, min(1.0, d)))
        c0, c1, branch = (
            math.sin((1 - t) * omega) / math.sin(omega),
            math.sin(t * omega) / math.sin(omega),
            "slerp",
        )
    result, magnitude = combo([v0, v1], [c0, c1])
    return result, magnitude, branch, d


def assert_bf16_close(
    out: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, name: str, slack: float = 0.0
) -> None:
    """``out`` (bf16) is ``expected`` (float64) rounded once to bf16, up to fp32 compute error.

    ``magnitude`` is sum_i |c_i| |x_i| elementwise (the scale of the fp32 rounding errors).
    """
    assert out.dtype == torch.bfloat16, name
    assert out.shape == expected.shape, name
    diff = (out.double() - expected).abs()
    bound = BF16_HALF_ULP * expected.abs() + (1e-5 + slack) * magnitude + 1e-30
    bad = diff > bound
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst excess {(diff - bound).max().item():.3g}"
    )


def add_word_tokenizer(folder: Path, vocab: int) -> None:
    """Save a word-level tokenizer (word ``w<i>`` is token i, no special tokens) into a model folder,
    so that recipes can cut a text file into token sequences with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)


def word_text(path: Path, vocab: int, words: int = 400, seed: int = 5) -> torch.Tensor:
    """Write ``words`` random words of that tokenizer to ``path``; returns their token ids."""
    ids = torch.randint(0, vocab, (words,), generator=torch.Generator().manual_seed(seed))
    path.write_text(" ".join(f"w{i}" for i in ids.tolist()))
    return ids


def documented_hash(x: int) -> int:
    """The 32-bit integer hash of DARE's masks, as workbench_kernels.dare's docstring gives it."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    return x ^ (x >> 15)
