"""Run the same mergekit recipes through mergekit and through ``workbench run``; report the differences.

mergekit is never a dependency of the workbench: this script installs it into a throwaway virtual
environment of its own (CPU torch first, so no CUDA build is pulled) and calls its ``mergekit-yaml``
command. Both tools read the same YAML file, unchanged, on tiny generated Llama-shaped models (a
bf16 base and three fine-tunes from ``workbench.checkpoint.synthetic``), and every output tensor is compared.

For the deterministic methods the outputs must agree within bf16 rounding: the recipes compute in
float32 and write bfloat16, so two correct implementations that sum in a different order may round
a value to neighbouring bf16 numbers, never further (``steps`` defines the measure). TIES and
breadcrumbs keep exactly k entries by magnitude; where a group of equal magnitudes straddles the
cut (frequent in bf16 task vectors), mergekit's argsort keeps an arbitrary part of the group and
the workbench the earliest entries, so those entries are excluded from the element-wise check and
counted apart. DARE's random masks come from different random generators in the two tools
(mergekit: torch's global generator; the workbench: a counter-based generator keyed per tensor and
model), so
those rows are compared by the size of the merged change instead (‖merge − base‖₁ per tensor,
workbench / mergekit), and DARE with density 1 (nothing dropped) is compared element-wise.

    python benchmarks/mergekit_parity.py [--venv DIR] [--work DIR] [--json FILE]

Exits non-zero when a deterministic method is off by more than one bf16 step.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
GRADIENT = [0.0, 0.5, 1.0]


def cases(models: Path, models32: Path) -> dict[str, tuple[dict[str, Any], bool]]:
    """name -> (mergekit recipe, deterministic?). Each exercises the options named in issue 4.

    ``models`` are bf16, ``models32`` float32: float32 task vectors have almost no equal
    magnitudes, so the top-k cases on them are compared at nearly every element.
    """
    base, ft1, ft2, ft3 = (str(models / name) for name in ("base", "ft1", "ft2", "ft3"))
    base32, ft1_32, ft2_32 = (str(models32 / name) for name in ("base", "ft1", "ft2"))
    common = {"dtype": "float32", "out_dtype": "bfloat16"}

    def weighted(*pairs: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"model": m, "parameters": p} for m, p in pairs]

    three = weighted(
        (ft1, {"weight": 0.5, "density": 0.5}),
        (ft2, {"weight": 0.3, "density": 0.7}),
        (ft3, {"weight": 0.2, "density": 0.4}),
    )
    ties_like = {"base_model": base, "models": three, **common}
    return {
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


@dataclass
class Comparison:
    case: str
    deterministic: bool
    tensors: int
    max_abs_diff: float
    max_steps: float  # bf16 steps (see ``steps``), over the elements compared
    differing_share: float  # share of elements that differ at all
    tie_share: float  # share of elements excluded: a magnitude tie split by a top-k cut
    delta_l1_ratio: tuple[float, float]  # min, max over tensors of ||wb - base||_1 / ||mk - base||_1
    within_bf16_rounding: bool
    seconds: tuple[float, float]  # mergekit, workbench wall time (whole process)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits); the smallest normal spacing at 0."""
    magnitude = x.abs().float().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 7)


def steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 steps at the larger of |a| and |b|, never finer than the step of a value 256
    times smaller than the tensor's largest entry: where terms cancel to nearly 0, float32 round-off
    of the terms (2^-24 of their size) is all that differs, and it is far below that floor."""
    a, b = a.float(), b.float()
    floor = bf16_ulp(torch.maximum(a.abs().max(), b.abs().max())) / 256
    return (a - b).abs() / torch.maximum(bf16_ulp(torch.maximum(a.abs(), b.abs())), floor)


def split_ties(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Entries whose magnitude equals a top-k cut that falls inside a group of equal magnitudes.

    mergekit keeps exactly ``int(density * n)`` entries after dropping the ``int(gamma * n)``
    largest (its argsort picks arbitrarily among equal magnitudes); at such entries either tool may
    keep a different member of the group, so they are compared by norm only.
    """
    w = tau.abs().reshape(-1).float()
    n = w.numel()
    split = torch.zeros(n, dtype=torch.bool)
    if density >= 1 or n == 0:
        return split.reshape(tau.shape)
    k = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - k - n_top)
    ordered = torch.sort(w).values
    for rank in (n_bot, n_bot + k):  # first kept, first dropped above the kept range
        if 0 < rank < n and ordered[rank - 1] == ordered[rank]:
            split |= w == ordered[rank]
    return split.reshape(tau.shape)


def compare(
    mergekit_out: Path,
    workbench_out: Path,
    base: dict[str, torch.Tensor] | None,
    inputs: list[dict[str, torch.Tensor]],
    cuts: list[tuple[float, float]],
) -> dict[str, Any]:
    """Element-wise differences of two outputs over every tensor; names and shapes must agree.

    ``cuts``: (density, gamma) of each input's magnitude top-k, for the methods that have one.
    """
    mk, wb = _load(mergekit_out), _load(workbench_out)
    if set(mk) != set(wb):
        raise SystemExit(
            f"tensor names differ: only mergekit {sorted(set(mk) - set(wb))}, "
            f"only workbench {sorted(set(wb) - set(mk))}"
        )
    max_abs, max_steps, differing, tied, total = 0.0, 0.0, 0, 0, 0
    ratios = []
    for name, a in mk.items():
        b = wb[name]
        if a.shape != b.shape:
            raise SystemExit(f"{name}: shape {tuple(a.shape)} (mergekit) vs {tuple(b.shape)} (workbench)")
        ties = torch.zeros(a.shape, dtype=torch.bool)
        for model, (density, gamma) in zip(inputs, cuts):
            ties |= split_ties(model[name].float() - base[name].float(), density, gamma)
        diff = (a.float() - b.float()).abs()
        if not bool(ties.all()):
            max_abs = max(max_abs, float(diff[~ties].max()))
            max_steps = max(max_steps, float(steps(a, b)[~ties].max()))
        differing += int((diff > 0).sum())
        tied += int(ties.sum())
        total += diff.numel()
        mk_delta = float((a.float() - base[name].float()).abs().sum()) if base is not None else 0.0
        if base is not None and mk_delta > 0:
            ratios.append(float((b.float() - base[name].float()).abs().sum()) / mk_delta)
    return {
        "tensors": len(mk),
        "max_abs_diff": max_abs,
        "max_steps": max_steps,
        "differing_share": differing / max(total, 1),
        "tie_share": tied / max(total, 1),
        "delta_l1_ratio": (min(ratios), max(ratios)) if ratios else (math.nan, math.nan),
    }


def _load(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    if not tensors:
        raise SystemExit(f"{folder}: no safetensors output")
    return tensors


def ensure_mergekit(venv: Path) -> Path:
    """``mergekit-yaml`` from a virtual environment of its own, created on first use."""
    command = venv / "bin" / "mergekit-yaml"
    if command.exists():
        return command
    print(
        f"installing mergekit {MERGEKIT_VERSION} into {venv} (throwaway; torch {TORCH_VERSION} CPU first) ...",
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return command


def timed(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.run(command, check=False, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {status}); its output is in {log}")
    return time.perf_counter() - start


MAGNITUDE_METHODS = {
    "ties": 0.0,
    "breadcrumbs": 0.01,
    "breadcrumbs_ties": 0.01,
}  # -> mergekit's default gamma


def magnitude_cuts(recipe: dict[str, Any]) -> list[tuple[float, float]]:
    """(density, gamma) per input of a magnitude top-k recipe (constants in these cases); [] otherwise."""
    method = recipe["merge_method"]
    if method not in MAGNITUDE_METHODS:
        return []
    return [
        (m["parameters"].get("density", 1.0), m["parameters"].get("gamma", MAGNITUDE_METHODS[method]))
        for m in recipe["models"]
    ]


def run(venv: Path, work: Path) -> list[Comparison]:
    from workbench.checkpoint.synthetic import write_family

    mergekit_yaml = ensure_mergekit(venv)
    models, models32 = work / "models", work / "models32"
    for folder, dtype in ((models, "bfloat16"), (models32, "float32")):
        if not (folder / "ft3" / "config.json").is_file():
            write_family(folder, "tiny", 3, dtype=dtype)
    weights = {
        str(folder): _load(folder) for family in (models, models32) for folder in sorted(family.iterdir())
    }
    workbench = [sys.executable, "-m", "workbench"]
    results = []
    for index, (name, (recipe, deterministic)) in enumerate(cases(models, models32).items()):
        folder = work / f"case{index:02d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        config = folder / "mergekit.yml"
        config.write_text(yaml.safe_dump(recipe, sort_keys=False))
        mk_seconds = timed(
            [
                str(mergekit_yaml),
                str(config),
                str(folder / "mergekit"),
                "--no-copy-tokenizer",
                "--random-seed",
                "0",
                "--quiet",
            ],
            folder / "mergekit.log",
        )
        wb_seconds = timed(
            [*workbench, "run", str(config), "--out", str(folder / "workbench")], folder / "workbench.log"
        )
        stacked = "slices" in recipe  # layers renumbered: compared as outputs only
        inputs = [] if stacked else [weights[m["model"]] for m in recipe["models"]]
        base = None if stacked else weights[recipe.get("base_model", str(models / "base"))]
        figures = compare(folder / "mergekit", folder / "workbench", base, inputs, magnitude_cuts(recipe))
        within = figures["max_steps"] <= 1.0
        results.append(
            Comparison(
                name, deterministic, within_bf16_rounding=within, seconds=(mk_seconds, wb_seconds), **figures
            )
        )
        verdict = (
            ("within bf16 rounding" if within else "OFF BY MORE THAN ONE bf16 STEP")
            if deterministic
            else "random masks"
        )
        print(
            f"{name:52s} max |diff| {figures['max_abs_diff']:.3g} ({figures['max_steps']:.2f} steps)  {verdict}",
            flush=True,
        )
    return results


def markdown(results: list[Comparison]) -> str:
    lines = [
        "| recipe | max abs difference | max bf16 steps | elements differing | "
        "split ties (excluded) | ‖Δ‖₁ workbench / mergekit, per tensor | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lo, hi = r.delta_l1_ratio
        if r.deterministic:
            verdict = "within bf16 rounding" if r.within_bf16_rounding else "**differs**"
        else:
            verdict = "random masks differ by design"
        ties = f"{100 * r.tie_share:.2f}%" if r.tie_share else "none"
        ratio = "n/a" if math.isnan(lo) else f"{lo:.4f}-{hi:.4f}"
        lines.append(
            f"| {r.case} | {r.max_abs_diff:.3g} | {r.max_steps:.2f} | "
            f"{100 * r.differing_share:.2f}% | {ties} | {ratio} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path(tempfile.gettempdir()) / "workbench-mergekit-venv",
        help="throwaway virtual environment for mergekit",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep models, recipes and outputs here (default: a temporary folder)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="workbench-parity-") as tmp:
            results = run(args.venv, Path(tmp))
    else:
        results = run(args.venv, args.work)
    print()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if any(r.deterministic and not r.within_bf16_rounding for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
