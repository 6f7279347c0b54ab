"""Shared fixtures: tiny models generated here (never downloaded) and their tensors, the registry, a CLI
runner, and fake third-party plugins for the registry tests."""

from __future__ import annotations

import importlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

# Fuzzing (tests/test_fuzz_*.py): the suite runs a bounded number of examples per target;
# `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs many more. Deadlines are off: a slow example on a
# loaded CI machine is not a failure; a hang is caught by the fuzz tests' own time limit.
settings.register_profile(
    "suite", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz", max_examples=50_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

# Without a GPU, the Triton kernels run under the Triton interpreter; it must be chosen before
# workbench_kernels is imported (the interpreter reads this when a kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from merging import load_dir  # noqa: E402  # after TRITON_INTERPRET is set
from plugin_site import install_plugin  # noqa: E402  # after TRITON_INTERPRET is set

import workbench.registry as registry_module  # noqa: E402  # after TRITON_INTERPRET is set
from workbench.checkpoint.synthetic import write_family  # noqa: E402  # after TRITON_INTERPRET is set
from workbench.registry import Registry, load_registry  # noqa: E402  # after TRITON_INTERPRET is set

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama-shaped base model and two fine-tunes of it (bf16), shared by the session.

    Tests must not modify these folders; copy them first.
    """
    root = tmp_path_factory.mktemp("family")
    base, ft1, ft2 = write_family(root, "tiny", fine_tunes=2)
    return {"base": base, "ft1": ft1, "ft2": ft2}


@pytest.fixture(scope="module")
def weights(tiny_family: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of ``tiny_family``, read back with safetensors, by model key."""
    return {key: load_dir(path) for key, path in tiny_family.items()}


@pytest.fixture(scope="module")
def layers(tiny_family: dict[str, Path]) -> int:
    """The number of layers of ``tiny_family``."""
    count = int(json.loads((tiny_family["base"] / "config.json").read_text())["num_hidden_layers"])
    assert count >= 3, "the gradient tests need at least three layers"
    return count


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry()


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture
def make_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Create a fake installed distribution with one ``workbench.plugins`` entry point.

    Returns the plugin's module name. The folder is put on ``sys.path`` first, like a package
    installed in an earlier site directory.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def make(package: str, entry_point: str, source: str, version: str = "0.1") -> str:
        module = f"wb_test_plugin_{entry_point}_{uuid.uuid4().hex[:8]}"
        install_plugin(site, package, entry_point, module, source, version)
        modules.append(module)
        importlib.invalidate_caches()
        return module

    yield make
    for module in modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


@pytest.fixture
def fresh_cli_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI load the registry again (it caches one per process); restored afterwards."""
    monkeypatch.setattr(registry_module, "_cached", None)


@pytest.fixture
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No allow or block list from the environment (the registry test modules use it for every test)."""
    monkeypatch.delenv("WORKBENCH_PLUGINS", raising=False)
    monkeypatch.delenv("WORKBENCH_DISABLE_PLUGINS", raising=False)
