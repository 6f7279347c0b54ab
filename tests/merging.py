"""Helpers shared by the method tests: run a recipe and read every output tensor back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from workbench.engine import run_recipe
from workbench.recipe import parse_recipe


def q(path: Path) -> str:
    """A path quoted for a YAML recipe."""
    return json.dumps(str(path))


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read with safetensors (independent of the project's reader)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no tensors in {directory}"
    return tensors


def merge(tmp_path: Path, text: str, name: str = "out") -> dict[str, torch.Tensor]:
    """Run recipe ``text`` into ``tmp_path/name`` and return the output tensors."""
    run_recipe(parse_recipe(text), out=tmp_path / name)
    return load_dir(tmp_path / name)
