"""Public testing helpers for plugin authors: tiny model families and the standard property checks.

A method proves itself with a few lines in its package's tests::

    from workbench.testing import (
        check_deterministic,
        check_identity,
        check_one_hot,
        check_streaming_memory,
        tiny_family,
    )

    def test_trimmed_mean(tmp_path):
        family = tiny_family(tmp_path / "family")
        check_identity("trimmed_mean", family)
        check_one_hot(
            "trimmed_mean", family, lambda i, n: {"model_parameters": [{"weight": float(j == i)} for j in range(n)]}
        )
        check_deterministic("trimmed_mean", family)
        check_streaming_memory("trimmed_mean", tmp_path / "deep")

Every check runs the method through the real engine (recipe, plan, streaming merge, safetensors
output) and compares with values that do not come from the method: the input models themselves,
the bytes of another run, the memory of the process. A failed check raises :class:`PropertyViolation`
(an ``AssertionError``, so test runners show it as a failure) naming the tensor and the numbers.

This module is part of the plugin API (:data:`workbench.API_VERSION`).
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
import tempfile
import unittest
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from workbench.checkpoint.dtypes import ITEMSIZE
from workbench.checkpoint.synthetic import LlamaShape, write_family

if TYPE_CHECKING:
    import torch

    from workbench.registry import Registry

__all__ = [
    "DEEP",
    "Family",
    "MemoryReport",
    "PropertyViolation",
    "assert_models_equal",
    "build_recipe",
    "check_deterministic",
    "check_identity",
    "check_one_hot",
    "check_streaming_memory",
    "merge",
    "read_model",
    "tiny_family",
]

#: Many small layers: the inputs are ~200 times the largest tensor, so a method that holds the
#: model (or its output) is told apart from one that streams (~50 MB per model in bfloat16).
DEEP = LlamaShape(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=96,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
)

#: A recipe fragment: ``parameters`` (global), ``model_parameters`` (a list, one dict per model, or
#: one dict for every model), and any other recipe key (``seed``, ``dtype``, ``slices``...).
Fragment = Mapping[str, Any]


class PropertyViolation(AssertionError):
    """A method does not have a property it should: the message names the tensor and the numbers."""


@dataclass(frozen=True)
class Family:
    """A base model and fine-tunes of it (Llama-shaped safetensors folders generated here)."""

    base: Path
    models: tuple[Path, ...]


def tiny_family(
    root: str | Path, *, fine_tunes: int = 3, shape: str | LlamaShape = "tiny", seed: int = 0
) -> Family:
    """Write a base and ``fine_tunes`` fine-tunes into ``root`` (``base``, ``ft1``...), in bfloat16.

    Each fine-tune is the base plus its own small perturbation, so they differ from the base and
    from each other everywhere. ``shape`` is a size name of :data:`workbench.checkpoint.synthetic.SIZES` or a
    :class:`~workbench.checkpoint.synthetic.LlamaShape` (e.g. :data:`DEEP`). Nothing is downloaded.
    """
    base, *models = write_family(Path(root), shape, fine_tunes=fine_tunes, seed=seed)
    return Family(base, tuple(models))


def read_model(folder: str | Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of a safetensors model folder, read with the ``safetensors`` package (not the
    workbench's reader, so comparisons do not trust the code under test)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    if not tensors:
        raise FileNotFoundError(f"no safetensors tensors in {folder}")
    return tensors


def _registry(registry: "Registry | None") -> "Registry":
    from workbench.registry import get_registry

    return registry or get_registry()


def build_recipe(
    method: str,
    family: Family,
    fragment: Fragment | None = None,
    *,
    models: Sequence[Path] | None = None,
    registry: "Registry | None" = None,
) -> dict[str, Any]:
    """A recipe (as plain data) merging ``models`` (default: the family's fine-tunes) with
    ``method``, with the family's base when the method uses one, then ``fragment`` applied."""
    cls = _registry(registry).method(method)
    models = list(family.models if models is None else models)
    fragment = dict(fragment or {})
    per_model = fragment.pop("model_parameters", {})
    if isinstance(per_model, Mapping):
        per_model = [per_model] * len(models)
    if len(per_model) != len(models):
        raise ValueError(f"model_parameters has {len(per_model)} entries for {len(models)} models")
    recipe: dict[str, Any] = {
        "method": method,
        "models": [{"model": str(m), "parameters": dict(p)} for m, p in zip(models, per_model)],
    }
    if cls.base_model != "unused":
        recipe["base"] = str(family.base)
    recipe.update(fragment)
    return {k: v for k, v in recipe.items() if v is not None}


def _run(recipe: Mapping[str, Any], out: Path, registry: "Registry | None", prefetch: int = 2) -> Path:
    from workbench.engine.run import run_recipe
    from workbench.recipe.schema import parse_recipe

    parsed = parse_recipe(yaml.safe_dump(dict(recipe), sort_keys=False), f"<{recipe['method']} test recipe>")
    return run_recipe(parsed, out=out, registry=_registry(registry), prefetch=prefetch).out_dir


def merge(recipe: Mapping[str, Any], *, registry: "Registry | None" = None) -> dict[str, "torch.Tensor"]:
    """Run ``recipe`` (plain data, as :func:`build_recipe` makes) through the engine; return the
    merged tensors (the output folder is removed)."""
    with tempfile.TemporaryDirectory(prefix="workbench-test-") as tmp:
        return read_model(_run(recipe, Path(tmp) / "out", registry))


def assert_models_equal(
    merged: Mapping[str, "torch.Tensor"],
    expected: Mapping[str, "torch.Tensor"],
    *,
    tolerance: float = 0.0,
    what: str = "merge",
) -> None:
    """The same tensor names, shapes and dtypes, and values within ``tolerance`` (absolute, in
    float64) of each other; else a :class:`PropertyViolation` naming the first tensor that differs."""
    if set(merged) != set(expected):
        missing, extra = sorted(set(expected) - set(merged)), sorted(set(merged) - set(expected))
        raise PropertyViolation(
            f"{what}: the output's tensors differ from the expected model's (missing {missing[:3]}, extra {extra[:3]})"
        )
    for name, want in expected.items():
        got = merged[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise PropertyViolation(
                f"{what}: '{name}' is {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
            )
        diff = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
        if not diff <= tolerance:
            raise PropertyViolation(
                f"{what}: '{name}' differs from the expected values by up to {diff:.3g} (tolerance {tolerance:g})"
            )


def check_identity(
    method: str,
    family: Family,
    fragment: Fragment | None = None,
    *,
    copies: int | None = None,
    tolerance: float = 0.0,
    registry: "Registry | None" = None,
) -> None:
    """Merging copies of one model, at full weight, gives that model back.

    ``copies`` defaults to two (one for a method that takes a single model); ``fragment`` holds
    the parameters that mean "full weight" when the defaults do not (e.g. ``lambda: 0.5`` for the
    sum of two copies' task vectors). ``tolerance`` is the largest absolute difference allowed.
    """
    cls = _registry(registry).method(method)
    count = copies or max(cls.min_models, 1 if cls.max_models == 1 else 2)
    model = family.models[0]
    recipe = build_recipe(method, family, fragment, models=[model] * count, registry=registry)
    assert_models_equal(
        merge(recipe, registry=registry),
        read_model(model),
        tolerance=tolerance,
        what=f"identity ({count} copies of {model.name})",
    )


def check_one_hot(
    method: str,
    family: Family,
    select: Callable[[int, int], Fragment],
    *,
    models: Sequence[Path] | None = None,
    tolerance: float = 0.0,
    registry: "Registry | None" = None,
) -> None:
    """For each model i of the n ``models`` (default: the family's fine-tunes), the fragment
    ``select(i, n)`` (e.g. weight 1 for model i and 0 for the others) makes their merge equal model i."""
    models = list(family.models if models is None else models)
    count = len(models)
    for i, model in enumerate(models):
        recipe = build_recipe(method, family, select(i, count), models=models, registry=registry)
        assert_models_equal(
            merge(recipe, registry=registry),
            read_model(model),
            tolerance=tolerance,
            what=f"one-hot selection of model {i} ({model.name}) of {count}",
        )


def check_deterministic(
    method: str,
    family: Family,
    fragment: Fragment | None = None,
    *,
    models: Sequence[Path] | None = None,
    registry: "Registry | None" = None,
) -> None:
    """Two runs of the same recipe, scheduled differently (no read-ahead, then deep read-ahead),
    write byte-identical weights: random methods must seed from ``ctx.seed``, not global state."""
    recipe = build_recipe(method, family, fragment, models=models, registry=registry)
    with tempfile.TemporaryDirectory(prefix="workbench-test-") as tmp:
        first = _run(recipe, Path(tmp) / "first", registry, prefetch=1)
        second = _run(recipe, Path(tmp) / "second", registry, prefetch=6)
        files = sorted(p.name for p in first.glob("*.safetensors"))
        if files != sorted(p.name for p in second.glob("*.safetensors")):
            raise PropertyViolation(
                f"determinism: the two runs wrote different files: {files} and "
                f"{sorted(p.name for p in second.glob('*.safetensors'))}"
            )
        for name in files:
            if (first / name).read_bytes() != (second / name).read_bytes():
                a, b = read_model(first), read_model(second)
                differ = [t for t in a if not (a[t].shape == b[t].shape and bool((a[t] == b[t]).all()))]
                raise PropertyViolation(
                    f"determinism: two runs of the same recipe differ in {name} (tensors {differ[:3]})"
                )


@dataclass(frozen=True)
class MemoryReport:
    """What :func:`check_streaming_memory` measured (bytes)."""

    peak_extra: int  # the process's peak resident memory during the merge, above where it started
    allowance: int  # what a streaming merge may use: see check_streaming_memory
    inputs: int  # the bytes of every input tensor the merge reads
    largest_tensor: int  # the largest input tensor in the compute dtype
    declared: int  # what the method's memory_needed declares for its prepare pass
    holds: int = 0  # what the test allowed the method to hold beyond streaming (its own bound)


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise unittest.SkipTest(f"/proc/self/status has no {field}: the memory check needs Linux")
    return int(match[1]) * 1024


def _release_free_memory() -> None:
    """Give freed heap memory back to the system, so that memory an earlier merge freed cannot hide
    what this one holds (it would be reused without raising the resident size)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM restarts from VmRSS
    except OSError as exc:
        raise unittest.SkipTest(
            f"cannot reset the peak resident memory ({exc}): the memory check needs Linux"
        ) from None


def check_streaming_memory(
    method: str,
    root: str | Path,
    fragment: Fragment | None = None,
    *,
    fine_tunes: int = 2,
    tensors_held: int = 8,
    slack: int = 24 * 2**20,
    family: Family | None = None,
    warm_up: Family | None = None,
    registry: "Registry | None" = None,
    holds: int = 0,
) -> MemoryReport:
    """Merging a deep model (:data:`DEEP`, ~200 times its largest tensor) keeps the process's
    peak resident memory within ``slack + tensors_held * (inputs + 1) * largest tensor`` plus
    ``holds``: the core streams tensor by tensor, and a method that keeps tensors (or its outputs)
    across calls breaks this bound.

    ``holds`` is what the method may keep beyond streaming (whole-model state of ``prepare``), as a
    bound the test computes itself from the inputs and the method's definition, e.g. ``4 * P`` bytes
    for the base model's P parameters loaded in float32. What the method declares with
    ``memory_needed`` never widens the allowance; it is checked against the measurement instead: a
    method that declares a need must be given ``holds``, and its peak must not exceed the streaming
    allowance plus what it declared (else the planner's memory check would pass recipes that do not
    fit).

    Give the method the inputs that reach its real code path (``fine_tunes``, or ``family``): a
    trimmed mean of two models trims nothing. The deep family (~50 MB per model) and the output are
    written under ``root``. A small merge (of ``warm_up``, by default a tiny family written under
    ``root``) runs first so that one-time costs (compiled kernels, imports) are not counted. Linux
    only (the peak is read from ``/proc``); elsewhere the check is skipped.
    """
    from workbench.engine.plan import build_plan
    from workbench.recipe.schema import parse_recipe

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="memory-check-", dir=root)) / "out"
    family = family or tiny_family(root / "deep", fine_tunes=fine_tunes, shape=DEEP)
    warm_up = warm_up or tiny_family(root / "warm-up", fine_tunes=len(family.models))
    merge(build_recipe(method, warm_up, fragment, registry=registry), registry=registry)

    recipe = build_recipe(method, family, fragment, registry=registry)
    plan = build_plan(parse_recipe(yaml.safe_dump(recipe), "<memory check>"), _registry(registry), out=out)
    try:
        inputs = sum(t.input_bytes for t in plan.tensors)
        # in the compute dtype, at least float32 (methods may widen to compute)
        largest = max(math.prod(t.shape) for t in plan.tensors) * max(4, ITEMSIZE[plan.compute_dtype])
        declared = plan.prepare_memory.nbytes if plan.prepare_memory else 0
    finally:
        plan.close()
    count = len(family.models) + (1 if "base" in recipe else 0)
    streaming = slack + tensors_held * (count + 1) * largest
    allowance = streaming + holds
    mb = 2**20
    if declared and not holds:
        raise PropertyViolation(
            f"streaming memory: '{method}' declares {declared / mb:.0f} MB with memory_needed; give "
            "check_streaming_memory holds=, a bound of what it keeps computed from the inputs, to check it"
        )

    _release_free_memory()
    before = _status_kb("VmRSS")
    _reset_peak()
    _run(recipe, out, registry)
    peak = _status_kb("VmHWM")
    report = MemoryReport(peak - before, allowance, inputs, largest, declared, holds)
    if report.peak_extra > allowance:
        raise PropertyViolation(
            f"streaming memory: merging {inputs / mb:.0f} MB of inputs with '{method}' raised the peak "
            f"resident memory by {report.peak_extra / mb:.0f} MB; a streaming merge may use "
            f"{allowance / mb:.0f} MB here ({slack / mb:.0f} MB + {tensors_held} x {count + 1} tensors of "
            f"{largest / mb:.2f} MB + {holds / mb:.0f} MB the test allows it to hold). Does the method "
            "keep tensors or outputs between calls?"
        )
    if declared and report.peak_extra > streaming + declared:
        raise PropertyViolation(
            f"streaming memory: '{method}' declares {declared / mb:.0f} MB with memory_needed but raised the "
            f"peak by {report.peak_extra / mb:.0f} MB, more than {streaming / mb:.0f} MB of streaming plus "
            "what it declares: the planner's memory check would accept recipes that do not fit"
        )
    return report
