"""Helpers shared by the registry tests: the built-in baseline, a fake third-party method, and the
``workbench methods`` table read back as rows. The fixtures (``make_plugin``, ``fresh_cli_registry``,
``_no_plugin_env``) are in conftest.py."""

from __future__ import annotations

import re
from collections.abc import Callable

from workbench.registry import load_registry

WIDE = {"COLUMNS": "1000"}
#: What the installed built-in plugins register, read before any fake plugin exists: the registry
#: tests check that a broken or clashing plugin leaves exactly this set in place.
BUILTIN_METHODS = set(load_registry().methods)
CORE = "merge-workbench"

MakePlugin = Callable[..., str]

FAKE_MAX = """
    from workbench import hookimpl
    from workbench.method import MergeMethod, MethodParameters, Param


    class FakeMaxParameters(MethodParameters):
        scale: float = Param(1.0, description="Multiply the elementwise maximum by this.")


    class FakeMax(MergeMethod):
        name = "fake_max"
        summary = "Elementwise maximum of the models, scaled."
        paper = "https://example.org/fake-max"
        Parameters = FakeMaxParameters
        base_model = "unused"
        min_models = 2

        def apply(self, tensors, base, params, model_params, ctx):
            import torch

            out = tensors[0].to(ctx.compute_dtype)
            for t in tensors[1:]:
                out = torch.maximum(out, t.to(ctx.compute_dtype))
            return out * params.scale


    @hookimpl
    def register_methods(register):
        register(FakeMax)
"""


def _rows(output: str) -> dict[str, list[str]]:
    """Table rows of a rich listing, keyed by first cell (cells are separated by 2+ spaces)."""
    rows = {}
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows
