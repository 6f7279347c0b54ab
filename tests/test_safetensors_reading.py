"""Reading tensors through private per-tensor mappings: the right bytes, writes that never reach
the file, mappings released with the tensors, and a clear error for a file cut short meanwhile."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workbench.checkpoint.safetensors_io import SafetensorsFile
from workbench.errors import CheckpointError


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),  # odd byte offsets in the file
        "b": torch.randn(1000, 37, generator=g),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def mappings_of(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_tensors_and_row_blocks_read_back_exactly(checkpoint):
    path, tensors = checkpoint
    st = SafetensorsFile(path)
    try:
        for name, expected in tensors.items():
            info, begin = st.tensors[name]
            assert torch.equal(st.read(info, begin), expected)
        info, begin = st.tensors["b"]
        assert torch.equal(st.read(info, begin, (10, 17)), tensors["b"][10:17])
    finally:
        st.close()


def test_writes_to_a_read_tensor_stay_private(checkpoint):
    path, tensors = checkpoint
    before = path.read_bytes()
    st = SafetensorsFile(path)
    try:
        info, begin = st.tensors["b"]
        x = st.read(info, begin)
        x.mul_(2.0)
        assert torch.equal(x, tensors["b"] * 2.0)
        assert torch.equal(st.read(info, begin), tensors["b"])
    finally:
        st.close()
    assert path.read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_a_mapping_lives_as_long_as_its_tensor(checkpoint):
    path, _ = checkpoint
    st = SafetensorsFile(path)
    try:
        info, begin = st.tensors["b"]
        kept = [st.read(info, begin) for _ in range(5)]
        assert mappings_of(path) == 5
        del kept
        gc.collect()
        assert mappings_of(path) == 0
    finally:
        st.close()


def test_a_file_cut_short_after_opening_is_named(checkpoint):
    path, _ = checkpoint
    st = SafetensorsFile(path)
    try:
        os.truncate(path, path.stat().st_size - 100)
        info, begin = st.tensors["b"]
        with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'b' is cut short"):
            st.read(info, begin)
    finally:
        st.close()
