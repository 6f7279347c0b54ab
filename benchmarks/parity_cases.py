"""The recipes of the mergekit parity benchmark (``benchmarks/mergekit_parity.py``): one per method
mergekit 0.1.5 registers and per recipe feature, each run unchanged through both tools.

Each case says how the two outputs are compared: element by element within bf16 rounding
(deterministic methods), by the size and the share of the change (methods drawing random masks,
whose generators can't be matched), and, for the cases that name a ``reference``, by the share of
elements equal to the float64 result rounded once (how accurate each tool is, not only how close
they are to each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRADIENT = [0.0, 0.5, 1.0]


@dataclass(frozen=True)
class Case:
    recipe: dict[str, Any]
    deterministic: bool = True
    #: A float64 definition of the result (see ``references`` in mergekit_parity.py), or None.
    reference: str | None = None


def _weighted(*pairs: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": m, "parameters": p} for m, p in pairs]


def cases(models: Path, models32: Path) -> dict[str, Case]:
    """name -> case. ``models`` are bf16, ``models32`` float32: float32 task vectors have almost no
    equal magnitudes, so the top-k cases on them are compared at nearly every element."""
    return {**_first_cases(models, models32), **_new_methods(models), **_half_compute(models)}


def _first_cases(models: Path, models32: Path) -> dict[str, Case]:
    """The methods and features of the first plan (issue 4)."""
    base, ft1, ft2, ft3 = (str(models / name) for name in ("base", "ft1", "ft2", "ft3"))
    base32, ft1_32, ft2_32 = (str(models32 / name) for name in ("base", "ft1", "ft2"))
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    weighted = _weighted
    three = weighted(
        (ft1, {"weight": 0.5, "density": 0.5}),
        (ft2, {"weight": 0.3, "density": 0.7}),
        (ft3, {"weight": 0.2, "density": 0.4}),
    )
    ties_like = {"base_model": base, "models": three, **common}
    found = {
        "linear": (
            {
                "merge_method": "linear",
                "models": weighted((ft1, {"weight": 0.6}), (ft2, {"weight": 0.2})),
                **common,
            },
            True,
        ),
        "linear, gradients + filters, normalize: false": (
            {
                "merge_method": "linear",
                "models": weighted(
                    (
                        ft1,
                        {
                            "weight": [
                                {"filter": "self_attn", "value": GRADIENT},
                                {"filter": "mlp", "value": 0.3},
                                {"value": 0.5},
                            ]
                        },
                    ),
                    (ft2, {"weight": [{"filter": "self_attn", "value": [1.0, 0.5, 0.0]}, {"value": 0.5}]}),
                ),
                "parameters": {"normalize": False},
                **common,
            },
            True,
        ),
        "linear, bfloat16 compute": (
            {
                "merge_method": "linear",
                "models": weighted((ft1, {"weight": 1.0}), (ft2, {"weight": 1.0})),
                "dtype": "bfloat16",
            },
            True,
        ),
        "slerp, t gradient per filter": (
            {
                "merge_method": "slerp",
                "base_model": ft1,
                "models": [{"model": ft1}, {"model": ft2}],
                "parameters": {
                    "t": [
                        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                        {"value": 0.5},
                    ]
                },
                **common,
            },
            True,
        ),
        "task_arithmetic, lambda": (
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": weighted(
                    (ft1, {"weight": 0.7}), (ft2, {"weight": [0.2, 0.6]}), (ft3, {"weight": -0.3})
                ),
                "parameters": {"lambda": 0.8},
                **common,
            },
            True,
        ),
        "task_arithmetic, normalize: true": (
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": weighted((ft1, {"weight": 0.7}), (ft2, {"weight": 0.5})),
                "parameters": {"normalize": True},
                **common,
            },
            True,
        ),
        "ties (normalize default true)": ({"merge_method": "ties", **ties_like}, True),
        "ties, normalize: false, lambda, weight gradient": (
            {
                "merge_method": "ties",
                "base_model": base,
                "models": weighted(
                    (ft1, {"weight": [1.0, 0.4], "density": 0.2}), (ft2, {"weight": 1.0, "density": 0.5})
                ),
                "parameters": {"normalize": False, "lambda": 0.6},
                **common,
            },
            True,
        ),
        "ties, density 1": (
            {
                "merge_method": "ties",
                "base_model": base,
                "models": weighted(
                    (ft1, {"weight": 1.0, "density": 1.0}), (ft2, {"weight": 1.0, "density": 1.0})
                ),
                **common,
            },
            True,
        ),
        "breadcrumbs": (
            {
                "merge_method": "breadcrumbs",
                "base_model": base,
                "models": weighted(
                    (ft1, {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                    (ft2, {"weight": 0.5, "density": 0.7, "gamma": 0.02}),
                ),
                **common,
            },
            True,
        ),
        "breadcrumbs_ties": (
            {
                "merge_method": "breadcrumbs_ties",
                "base_model": base,
                "models": weighted(
                    (ft1, {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
                    (ft2, {"weight": 1.0, "density": 0.7, "gamma": 0.02}),
                ),
                **common,
            },
            True,
        ),
        "ties, float32 inputs": (
            {
                "merge_method": "ties",
                "base_model": base32,
                "models": weighted(
                    (ft1_32, {"weight": 0.6, "density": 0.3}), (ft2_32, {"weight": 0.4, "density": 0.6})
                ),
                **common,
            },
            True,
        ),
        "breadcrumbs, float32 inputs": (
            {
                "merge_method": "breadcrumbs",
                "base_model": base32,
                "models": weighted(
                    (ft1_32, {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                    (ft2_32, {"weight": 0.5, "density": 0.7, "gamma": 0.02}),
                ),
                **common,
            },
            True,
        ),
        "breadcrumbs_ties, float32 inputs": (
            {
                "merge_method": "breadcrumbs_ties",
                "base_model": base32,
                "models": weighted(
                    (ft1_32, {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
                    (ft2_32, {"weight": 1.0, "density": 0.7, "gamma": 0.02}),
                ),
                **common,
            },
            True,
        ),
        "dare_linear, density 1": (
            {
                "merge_method": "dare_linear",
                "base_model": base,
                "models": weighted(
                    (ft1, {"weight": 0.6, "density": 1.0}), (ft2, {"weight": 0.4, "density": 1.0})
                ),
                **common,
            },
            True,
        ),
        "dare_ties, density 1": (
            {
                "merge_method": "dare_ties",
                "base_model": base,
                "models": weighted(
                    (ft1, {"weight": 0.6, "density": 1.0}), (ft2, {"weight": 0.4, "density": 1.0})
                ),
                **common,
            },
            True,
        ),
        "model_stock": (
            {
                "merge_method": "model_stock",
                "base_model": base,
                "models": [{"model": ft1}, {"model": ft2}, {"model": ft3}],
                **common,
            },
            True,
        ),
        "passthrough": ({"merge_method": "passthrough", "models": [{"model": ft2}], **common}, True),
        "passthrough, slices (4 layers -> 6)": (
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": ft1, "layer_range": [0, 3]}]},
                    {"sources": [{"model": ft2, "layer_range": [1, 4]}]},
                ],
                **common,
            },
            True,
        ),
        "slerp, slices": (
            {
                "merge_method": "slerp",
                "base_model": ft2,
                "slices": [
                    {
                        "sources": [
                            {"model": ft1, "layer_range": [0, 2]},
                            {"model": ft2, "layer_range": [2, 4]},
                        ]
                    },
                    {
                        "sources": [
                            {"model": ft1, "layer_range": [1, 4]},
                            {"model": ft2, "layer_range": [0, 3]},
                        ]
                    },
                ],
                "parameters": {"t": 0.3},
                **common,
            },
            True,
        ),
        "dare_linear, density 0.5 (random masks)": ({"merge_method": "dare_linear", **ties_like}, False),
        "dare_ties, density 0.5 (random masks)": ({"merge_method": "dare_ties", **ties_like}, False),
    }
    return {name: Case(recipe, deterministic) for name, (recipe, deterministic) in found.items()}


def _new_methods(models: Path) -> dict[str, Case]:
    """The ten methods issue 27 added, with the parameters mergekit accepts for them."""
    base, ft1, ft2, ft3 = (str(models / name) for name in ("base", "ft1", "ft2", "ft3"))
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    two = {"base_model": base, **common}
    three = _weighted(
        (ft1, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
        (ft2, {"weight": 0.3, "density": 0.7, "epsilon": 0.2}),
        (ft3, {"weight": 0.2, "density": 0.4, "epsilon": 0.15}),
    )
    pair = _weighted((ft1, {"weight": 0.7}), (ft2, {"weight": 0.4}))
    return {
        "nearswap, t 0.001": Case(
            {"merge_method": "nearswap", "models": [{"model": ft1}], "parameters": {"t": 0.001}, **two}
        ),
        "ram": Case({"merge_method": "ram", "models": [{"model": ft1}, {"model": ft2}], **two}),
        "ramplus_tl, r 0.3, alpha 0.5": Case(
            {
                "merge_method": "ramplus_tl",
                "models": [{"model": ft1}, {"model": ft2}, {"model": ft3}],
                "parameters": {"r": 0.3, "alpha": 0.5, "epsilon": 1e-4},
                **two,
            }
        ),
        "multislerp, over a base": Case(
            {"merge_method": "multislerp", "models": pair, **two}, reference="multislerp"
        ),
        "multislerp, no base, normalize_weights: false": Case(
            {
                "merge_method": "multislerp",
                "models": _weighted((ft1, {"weight": 0.6}), (ft2, {"weight": 0.3}), (ft3, {"weight": 0.1})),
                "parameters": {"normalize_weights": False},
                **common,
            }
        ),
        "karcher, max_iter 20": Case(
            {
                "merge_method": "karcher",
                "models": [{"model": ft1}, {"model": ft2}, {"model": ft3}],
                "parameters": {"max_iter": 20, "tol": 1e-6},
                **common,
            }
        ),
        "nuslerp, flattened": Case({"merge_method": "nuslerp", "models": pair, **two}),
        "nuslerp, rows, no base": Case(
            {
                "merge_method": "nuslerp",
                "models": pair,
                "parameters": {"nuslerp_flatten": False},
                **common,
            }
        ),
        "nuslerp, row_wise": Case(
            {
                "merge_method": "nuslerp",
                "models": pair,
                "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                **two,
            }
        ),
        "sce (no selection)": Case(
            {"merge_method": "sce", "models": [{"model": ft1}, {"model": ft2}, {"model": ft3}], **two}
        ),
        "sce, select_topk 0.5": Case(
            {
                "merge_method": "sce",
                "models": [{"model": ft1}, {"model": ft2}, {"model": ft3}],
                "parameters": {"select_topk": 0.5},
                **two,
            }
        ),
        "arcee_fusion": Case(
            {"merge_method": "arcee_fusion", "models": [{"model": ft1}], **two}, reference="arcee_fusion"
        ),
        "della, density 1": Case(
            {
                "merge_method": "della",
                "models": _weighted((ft1, {"weight": 0.6}), (ft2, {"weight": 0.4})),
                **two,
            }
        ),
        "ties, density 1, slices over a base": Case(
            {
                "merge_method": "ties",
                "base_model": base,
                "slices": [
                    {
                        "sources": [
                            {"model": base, "layer_range": [0, 2]},
                            {"model": ft1, "layer_range": [0, 2], "parameters": {"weight": 0.6}},
                            {"model": ft2, "layer_range": [1, 3], "parameters": {"weight": 0.4}},
                        ]
                    },
                    {
                        "sources": [
                            {"model": base, "layer_range": [1, 4]},
                            {"model": ft1, "layer_range": [1, 4], "parameters": {"weight": 0.6}},
                            {"model": ft2, "layer_range": [0, 3], "parameters": {"weight": 0.4}},
                        ]
                    },
                ],
                **common,
            }
        ),
        "della (random masks)": Case({"merge_method": "della", "models": three, **two}, deterministic=False),
        "della_linear (random masks)": Case(
            {"merge_method": "della_linear", "models": three, "parameters": {"lambda": 0.9}, **two},
            deterministic=False,
        ),
    }


def _half_compute(models: Path) -> dict[str, Case]:
    """mergekit users' habit, dtype: bfloat16 (compute and output), measured against float64."""
    base, ft1, ft2, ft3 = (str(models / name) for name in ("base", "ft1", "ft2", "ft3"))
    return {
        "task_arithmetic, bfloat16 compute": Case(
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": _weighted((ft1, {"weight": 0.7}), (ft2, {"weight": 0.5}), (ft3, {"weight": 0.3})),
                "parameters": {"lambda": 0.9},
                "dtype": "bfloat16",
            },
            reference="task_arithmetic",
        ),
        "task_arithmetic, density 0.5 (ignored), bfloat16 compute": Case(
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": _weighted((ft1, {"weight": 0.7, "density": 0.5}), (ft2, {"weight": 0.5})),
                "dtype": "bfloat16",
            },
            reference="task_arithmetic",
        ),
        "model_stock, bfloat16 compute": Case(
            {
                "merge_method": "model_stock",
                "base_model": base,
                "models": [{"model": ft1}, {"model": ft2}, {"model": ft3}],
                "dtype": "bfloat16",
            },
            reference="model_stock",
        ),
        "linear, bfloat16 compute, reference": Case(
            {
                "merge_method": "linear",
                "models": _weighted((ft1, {"weight": 0.6}), (ft2, {"weight": 0.4})),
                "dtype": "bfloat16",
            },
            reference="linear",
        ),
    }
