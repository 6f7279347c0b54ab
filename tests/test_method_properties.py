"""Every built-in method passes the standard property checks of :mod:`workbench.testing`, the same
checks a third-party plugin runs on its method (docs/plugins.md, "Testing a plugin").

Each method declares here the recipe fragments under which the properties hold: the parameters that
mean "full weight" for the identity, the selection of one model for the one-hot check. Where a
property does not apply, the entry says why instead (``NotApplicable``); a built-in method with no
entry fails :func:`test_every_builtin_method_declares_its_properties`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from merging import add_word_tokenizer, word_text

from workbench import hookimpl
from workbench.lora.extract import extract_lora
from workbench.method import MemoryNeed, MergeMethod, MethodParameters, Param
from workbench.registry import Registry, load_registry
from workbench.testing import (
    DEEP,
    Family,
    PropertyViolation,
    build_recipe,
    check_deterministic,
    check_identity,
    check_one_hot,
    check_streaming_memory,
    read_model,
    tiny_family,
)

Select = Callable[[int, int], dict[str, Any]]


@dataclass(frozen=True)
class NotApplicable:
    why: str


@dataclass(frozen=True)
class Properties:
    #: Used by every check (e.g. data for atlas, a random router for lora_experts).
    common: dict[str, Any] = field(default_factory=dict)
    #: Extra fragment for the identity check, or why it does not apply.
    identity: dict[str, Any] | NotApplicable = field(default_factory=dict)
    one_hot: Select | NotApplicable = NotApplicable("no selection declared")
    #: How many of the family's models the method takes (None: all three).
    models: int | None = None
    #: The inputs are LoRA adapters of the fine-tunes, not the fine-tunes.
    adapters: bool = False
    #: What the method keeps beyond streaming, from its definition (not from its memory_needed):
    #: (the base's parameter count, its (name, shape) list, the number of models) -> bytes.
    holds: Callable[[int, list[tuple[str, tuple[int, ...]]], int], int] | None = None


def weights(i: int, n: int) -> list[dict[str, float]]:
    return [{"weight": float(j == i)} for j in range(n)]


def one_hot_weights(extra: dict[str, Any] | None = None) -> Select:
    return lambda i, n: {"model_parameters": weights(i, n), **({"parameters": extra} if extra else {})}


HALF = {"parameters": {"lambda": 0.5}}  # two copies' task vectors sum to 2 tau
NO_SELECTION = "the method has no per-model weights that can select one model"

PROPERTIES: dict[str, Properties] = {
    "linear": Properties(one_hot=one_hot_weights()),
    "task_arithmetic": Properties(identity=HALF, one_hot=one_hot_weights()),
    "ties": Properties(one_hot=one_hot_weights()),
    "dare_ties": Properties(identity=HALF, one_hot=one_hot_weights()),
    "dare_linear": Properties(identity=HALF, one_hot=one_hot_weights()),
    "breadcrumbs": Properties(identity=HALF, one_hot=one_hot_weights()),
    "breadcrumbs_ties": Properties(identity=HALF, one_hot=one_hot_weights()),
    "della": Properties(one_hot=one_hot_weights()),
    "della_linear": Properties(identity=HALF, one_hot=one_hot_weights()),
    "model_stock": Properties(
        one_hot=NotApplicable("its ratio comes from the angle between the task vectors: " + NO_SELECTION)
    ),
    "pcb": Properties(
        common={"parameters": {"pcb_ratio": 1.0, "clip_ratio": 0.0}},
        one_hot=lambda i, n: {
            "parameters": {"pcb_ratio": 1.0, "clip_ratio": 0.0},
            "model_parameters": weights(i, n),
        },
    ),
    "lines": Properties(
        common={"parameters": {"alpha": 1.0, "beta": 0.0}},
        identity={"parameters": {"alpha": 1.0, "beta": 0.0, "merge_parameters": {"normalize": True}}},
        one_hot=lambda i, n: {"parameters": {"alpha": 1.0, "beta": 0.0}, "model_parameters": weights(i, n)},
    ),
    "slerp": Properties(
        common={"parameters": {"t": 0.5}}, one_hot=lambda i, n: {"parameters": {"t": float(i)}}, models=2
    ),
    "layer_swap": Properties(
        one_hot=lambda i, n: {
            "parameters": {
                "layer_map": ["task" if i == 0 else "language"] * 4,
                "non_layer": "task" if i == 0 else "language",
            }
        },
        models=2,
    ),
    "ot_fusion": Properties(
        common={"parameters": {"solver": "emd"}},
        holds=lambda params, shapes, models: ot_maps_bytes(shapes, models),
        one_hot=lambda i, n: {
            "parameters": {"solver": "emd", "anchor": i},
            "model_parameters": weights(i, n),
        },
    ),
    "passthrough": Properties(one_hot=NotApplicable("it takes a single model"), models=1),
    # t past every difference takes the other model whole (w = 1 everywhere)
    "nearswap": Properties(
        common={"parameters": {"t": 1e30}}, one_hot=NotApplicable("it takes a single model"), models=1
    ),
    # copies of one fine-tune change the same entries: each is averaged over the copies, i.e. kept;
    # epsilon 0, since entries changed by at most epsilon are dropped by definition
    "multislerp": Properties(one_hot=one_hot_weights()),
    "nuslerp": Properties(one_hot=one_hot_weights(), models=2),
    "karcher": Properties(one_hot=NotApplicable("equal weights by definition: " + NO_SELECTION)),
    "ram": Properties(identity={"parameters": {"epsilon": 0.0}}, one_hot=NotApplicable(NO_SELECTION)),
    "ramplus_tl": Properties(identity={"parameters": {"epsilon": 0.0}}, one_hot=NotApplicable(NO_SELECTION)),
    # two copies: equal weights, both agree wherever tau != 0, so base + tau is the model (at the
    # default select_topk 1; with selection the copies' variance is 0 and nothing would be kept)
    "sce": Properties(one_hot=NotApplicable(NO_SELECTION)),
    # one fine-tune's changes are kept only where their importance passes the tensor's fence
    "arcee_fusion": Properties(
        identity=NotApplicable(
            "it keeps the model's change only where its importance passes an outlier fence"
        ),
        one_hot=NotApplicable("it takes a single model"),
        models=1,
    ),
    "lora_experts": Properties(
        common={"parameters": {"router": "random", "allocation": "uniform"}},
        identity=NotApplicable("its output is experts and routers over the base, not a merge of models"),
        one_hot=NotApplicable("routers mix the experts per token: " + NO_SELECTION),
        adapters=True,
    ),
    "atlas": Properties(
        common={"parameters": {"steps": 1, "batch_size": 2, "samples": 8, "holdout": 0.0}},
        # lr 0 keeps every coefficient at init: two copies at 0.5 each add one task vector
        identity={
            "parameters": {"steps": 1, "batch_size": 2, "samples": 8, "holdout": 0.0, "lr": 0.0, "init": 0.5}
        },
        one_hot=NotApplicable("its coefficients are learned from data, one init for all: " + NO_SELECTION),
        # aTLAS trains coefficients over theta_0 + sum_t lambda_t tau_t: the base and the T task vectors
        # in float32, with theta(Lambda) and its gradient during a step (an upper bound: every tensor
        # trained); plus half as much again for the model's framework objects and the autograd graph
        # (measured: 587 MB here against 483 MB of those arrays)
        holds=lambda params, shapes, models: 3 * 4 * params * (models + 3) // 2,
    ),
}


def ot_maps_bytes(shapes: list[tuple[str, tuple[int, ...]]], models: int) -> int:
    """What OT fusion keeps (Imfeld et al. 2024): for each model aligned to the anchor, a transport
    map per layer's MLP hidden units and per residual junction (4 per layer and the embeddings', the
    per-sublayer policy), each a float32 plan and its column-normalised copy; and while one map is
    solved, POT's float64 cost matrix and plan of the largest width; doubled for the work arrays of
    solving and composing the maps."""
    shape = dict(shapes)
    hidden = shape["model.embed_tokens.weight"][1]
    widths = [s[0] for name, s in shapes if name.endswith("mlp.up_proj.weight")]
    entries = sum(width**2 for width in widths) + (4 * len(widths) + 1) * hidden**2
    maps = (models - 1) * entries * 2 * 4 + 2 * 8 * max([hidden, *widths]) ** 2
    return 2 * maps  # as much again while maps are solved and composed (measured: 366 MB, maps 244 MB)


def _builtin_methods(registry: Registry) -> dict[str, type[MergeMethod]]:
    return {
        name: entry.obj
        for name, entry in registry.methods.items()
        if entry.plugin.package == "merge-workbench"
    }


def test_every_builtin_method_declares_its_properties(registry: Registry) -> None:
    assert set(PROPERTIES) == set(_builtin_methods(registry))
    for name, props in PROPERTIES.items():
        for prop in (props.identity, props.one_hot):
            assert not isinstance(prop, NotApplicable) or len(prop.why) > 20, (
                f"{name}: say why a property does not apply"
            )


# ------------------------------------------------------------------------------------------------
# The families: tiny (identity, one-hot, determinism) and deep (memory), with what atlas and
# lora_experts need besides (a tokenizer and a text; LoRA adapters of the fine-tunes).
# ------------------------------------------------------------------------------------------------

VOCAB = 256  # the tiny and deep shapes' vocabulary


@dataclass(frozen=True)
class Inputs:
    family: Family
    text: Path  # words of the family's tokenizer, for atlas
    root: Path

    def adapters(self) -> list[Path]:
        """Rank-2 LoRA adapters of the fine-tunes (made on first use: only lora_experts needs them)."""
        folders = [self.root / f"adapter{i}" for i in range(len(self.family.models))]
        for folder, tuned in zip(folders, self.family.models):
            if not folder.exists():
                extract_lora(str(self.family.base), str(tuned), folder, rank=2, registry=load_registry())
        return folders

    def models(self, props: Properties) -> list[Path]:
        models = self.adapters() if props.adapters else list(self.family.models)
        return models[: props.models] if props.models else models


def _inputs(family: Family, root: Path) -> Inputs:
    add_word_tokenizer(family.base, VOCAB)
    word_text(root / "text.txt", VOCAB, words=400)
    return Inputs(family, root / "text.txt", root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("properties")
    return _inputs(tiny_family(root / "family"), root)


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("properties-deep")
    return _inputs(tiny_family(root / "family", fine_tunes=2, shape=DEEP), root)


def _fragment(
    name: str, props: Properties, text: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    fragment = {**props.common, **(extra or {})}
    if name == "atlas":  # every task learns from the same text
        fragment["parameters"] = {**fragment.get("parameters", {}), "data": {"text": str(text), "seq_len": 8}}
    return fragment


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_identity_at_full_weight(name: str, tiny: Inputs) -> None:
    props = PROPERTIES[name]
    if isinstance(props.identity, NotApplicable):
        pytest.skip(props.identity.why)
    check_identity(name, tiny.family, _fragment(name, props, tiny.text, props.identity))


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_one_hot_selection(name: str, tiny: Inputs) -> None:
    props = PROPERTIES[name]
    if isinstance(props.one_hot, NotApplicable):
        pytest.skip(props.one_hot.why)
    select = props.one_hot
    check_one_hot(
        name,
        tiny.family,
        lambda i, n: {**_fragment(name, props, tiny.text), **select(i, n)},
        models=tiny.models(props),
    )


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_deterministic(name: str, tiny: Inputs) -> None:
    props = PROPERTIES[name]
    check_deterministic(name, tiny.family, _fragment(name, props, tiny.text), models=tiny.models(props))


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_streaming_memory(name: str, tiny: Inputs, deep: Inputs, tmp_path: Path) -> None:
    props = PROPERTIES[name]
    # atlas learns from text cut with the base's tokenizer: the deep base has one, and so has the tiny warm-up
    fragment = _fragment(name, props, tiny.text)
    family = Family(deep.family.base, tuple(deep.models(props)))
    warm_up = Family(tiny.family.base, tuple(tiny.models(props)))
    holds = 0
    if props.holds is not None:
        shapes = [(n, tuple(x.shape)) for n, x in read_model(family.base).items() if x.is_floating_point()]
        holds = props.holds(sum(math.prod(s) for _, s in shapes), shapes, len(family.models))
    report = check_streaming_memory(name, tmp_path, fragment, family=family, warm_up=warm_up, holds=holds)
    assert report.peak_extra <= report.allowance and report.holds == holds


# ------------------------------------------------------------------------------------------------
# The checks themselves can fail: a method that breaks each property is caught.
# ------------------------------------------------------------------------------------------------


class _Broken(MergeMethod):
    """Weighted mean that (a) adds a tiny bias, (b) adds global-RNG noise, (c) keeps every output."""

    name = "broken_mean"
    summary = "A mean with the faults the property checks exist to catch."
    base_model = "unused"
    fault = ""
    kept: list[Any] = []

    class ModelParameters(MethodParameters):
        weight: float = Param(1.0, description="This model's weight.")

    def apply(self, tensors, base, params, model_params, ctx):  # type: ignore[no-untyped-def]
        import torch

        w = [p.weight for p in model_params]
        out = sum(wi * t.to(ctx.compute_dtype) for wi, t in zip(w, tensors)) / sum(w)
        if _Broken.fault == "bias":
            out = out + 1e-2
        if _Broken.fault == "noise":
            out = out + torch.rand(()) * 1e-2  # the global generator: depends on the schedule
        if _Broken.fault == "hoard":
            _Broken.kept.append(out.clone())
        return out


class _BrokenPlugin:
    @hookimpl
    def register_methods(self, register: Callable[[Any], None]) -> None:
        register(_Broken)


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Registry]:
    registry = load_registry(extra_plugins=[(_BrokenPlugin(), "broken")])

    def with_fault(fault: str) -> Registry:
        monkeypatch.setattr(_Broken, "fault", fault)
        monkeypatch.setattr(_Broken, "kept", [])
        return registry

    return with_fault


def test_a_correct_method_passes(broken: Callable[[str], Registry], tiny: Inputs) -> None:
    registry = broken("")
    family = tiny.family
    check_identity("broken_mean", family, registry=registry)
    check_one_hot("broken_mean", family, one_hot_weights(), registry=registry)
    check_deterministic("broken_mean", family, registry=registry)


@pytest.mark.parametrize(
    ("fault", "check", "message"),
    [
        ("bias", "identity", "identity (2 copies of ft1)"),
        ("bias", "one_hot", "one-hot selection of model 0"),
    ],
)
def test_a_wrong_value_fails(
    fault: str, check: str, message: str, broken: Callable[[str], Registry], tiny: Inputs
) -> None:
    registry, family = broken(fault), tiny.family
    with pytest.raises(PropertyViolation, match=re.escape(message)) as caught:
        if check == "identity":
            check_identity("broken_mean", family, registry=registry)
        else:
            check_one_hot("broken_mean", family, one_hot_weights(), registry=registry)
    assert "'model." in str(caught.value) or "'lm_head" in str(caught.value)  # names the tensor


def test_schedule_dependent_randomness_fails(broken: Callable[[str], Registry], tiny: Inputs) -> None:
    with pytest.raises(PropertyViolation, match="determinism: two runs of the same recipe differ"):
        check_deterministic("broken_mean", tiny.family, registry=broken("noise"))


def test_keeping_outputs_fails_the_memory_check(
    broken: Callable[[str], Registry], tiny: Inputs, deep: Inputs, tmp_path: Path
) -> None:
    with pytest.raises(PropertyViolation, match="Does the method keep tensors") as caught:
        check_streaming_memory(
            "broken_mean", tmp_path, family=deep.family, warm_up=tiny.family, registry=broken("hoard")
        )
    assert "MB" in str(caught.value)


def test_declaring_a_need_does_not_widen_the_allowance(
    broken: Callable[[str], Registry],
    tiny: Inputs,
    deep: Inputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A method that hoards and declares a huge memory_needed still fails: the allowance comes from
    the test's own bound, and a declared need without one is refused."""
    registry = broken("hoard")
    monkeypatch.setattr(_Broken, "memory_needed", lambda self, *args: MemoryNeed(2**33, "eight gigabytes"))
    with pytest.raises(
        PropertyViolation, match="declares 8192 MB with memory_needed; give check_streaming_memory holds="
    ):
        check_streaming_memory(
            "broken_mean", tmp_path, family=deep.family, warm_up=tiny.family, registry=registry
        )
    with pytest.raises(PropertyViolation, match="Does the method keep tensors"):
        check_streaming_memory(
            "broken_mean", tmp_path, family=deep.family, warm_up=tiny.family, registry=registry, holds=2**20
        )


def test_declaring_less_than_it_keeps_fails(
    broken: Callable[[str], Registry],
    tiny: Inputs,
    deep: Inputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test allows the hoarding (a generous bound) but the method declares 1 MB: the planner's
    memory check would pass recipes that do not fit, so the check fails."""
    registry = broken("hoard")
    monkeypatch.setattr(_Broken, "memory_needed", lambda self, *args: MemoryNeed(2**20, "one megabyte"))
    with pytest.raises(PropertyViolation, match="declares 1 MB with memory_needed but raised the peak"):
        check_streaming_memory(
            "broken_mean", tmp_path, family=deep.family, warm_up=tiny.family, registry=registry, holds=2**34
        )


def test_build_recipe_gives_the_base_only_to_methods_that_use_it(registry: Registry, tiny: Inputs) -> None:
    family = tiny.family
    linear = build_recipe("linear", family, registry=registry)
    ta = build_recipe(
        "task_arithmetic", family, {"model_parameters": {"weight": 0.3}, "seed": 4}, registry=registry
    )
    assert "base" not in linear and [m["model"] for m in linear["models"]] == [str(m) for m in family.models]
    assert ta["base"] == str(family.base) and ta["seed"] == 4
    assert [m["parameters"] for m in ta["models"]] == [{"weight": 0.3}] * 3
    assert json.dumps(ta)  # plain data, as a recipe file holds
