"""PyTorch ``.bin`` inputs: read weights-only (single file, shards, legacy format), merged exactly
like the same weights in safetensors; anything that needs real unpickling is refused unrun."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from merging import merge, q
from safetensors.torch import load_file

from workbench.errors import CheckpointError
from workbench.registry import get_registry


def as_bin(source: Path, target: Path, shards: int = 1, legacy: bool = False) -> Path:
    """The model folder ``source`` (safetensors) rewritten as pytorch_model.bin (or shards + index)."""
    state = load_file(next(source.glob("*.safetensors")))
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    if shards == 1:
        torch.save(state, target / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return target
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, target / file)
        weight_map.update(dict.fromkeys(part, file))
    (target / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return target


def linear(family: dict, ft1: Path) -> str:
    return f"""
method: linear
models:
  - model: {q(family["base"])}
    parameters: {{weight: 0.4}}
  - model: {q(ft1)}
    parameters: {{weight: 0.6}}
"""


@pytest.mark.hook("register_formats")
@pytest.mark.parametrize(
    ("shards", "legacy"), [(1, False), (3, False), (1, True)], ids=["single", "sharded", "legacy"]
)
def test_bin_input_merges_like_its_safetensors(tmp_path, tiny_family, shards, legacy):
    converted = as_bin(tiny_family["ft1"], tmp_path / "ft1_bin", shards, legacy)
    expected = merge(tmp_path, linear(tiny_family, tiny_family["ft1"]), "from_safetensors")
    got = merge(tmp_path, linear(tiny_family, converted), "from_bin")
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "was_run"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2, 2), "extra": _Payload(marker)},
        folder / "pytorch_model.bin",
    )
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to load.*arbitrary code"):
        get_registry().open_checkpoint(folder)
    assert not marker.exists()


def test_not_a_state_dict_and_a_missing_shard_are_named(tmp_path, tiny_family):
    folder = tmp_path / "list"
    folder.mkdir()
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        get_registry().open_checkpoint(folder)
    sharded = as_bin(tiny_family["ft1"], tmp_path / "sharded", shards=2)
    (sharded / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin does not exist"):
        get_registry().open_checkpoint(sharded)


@pytest.mark.hook("register_formats")
def test_safetensors_wins_where_a_folder_has_both(tmp_path, tiny_family):
    both = tmp_path / "both"
    shutil.copytree(tiny_family["ft1"], both)
    torch.save({"only.in.bin": torch.zeros(1)}, both / "pytorch_model.bin")
    reader = get_registry().open_checkpoint(both)
    assert "only.in.bin" not in reader.tensor_names()
    reader.close()
