"""Shared fixtures: tiny models generated here (never downloaded), the registry, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.registry import Registry, load_registry
from workbench.synthetic import write_family

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama-shaped base model and two fine-tunes of it (bf16), shared by the session.

    Tests must not modify these folders; copy them first.
    """
    root = tmp_path_factory.mktemp("family")
    base, ft1, ft2 = write_family(root, "tiny", fine_tunes=2)
    return {"base": base, "ft1": ft1, "ft2": ft2}


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()
