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
workbench / mergekit), and DARE with density 1 (nothing dropped) is compared element-wise. DELLA's
masks are random too, and compared the same way, with the share of changed elements besides. sce's
variance top-k has the same kind of ties as TIES's magnitudes, and they are excluded the same way.
Cases with a float64 ``reference`` (the ``dtype: bfloat16`` ones) also report, for each tool, the
share of elements equal to the float64 result rounded once.

    python benchmarks/mergekit_parity.py [--size tiny|60m] [--venv DIR] [--work DIR] [--json FILE]

The recipes are in ``parity_cases.py``. Exits non-zero when a deterministic method is off by more
than two bf16 steps (issue 27's bound).
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
from parity_cases import cases
from safetensors.torch import load_file

MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
#: Deterministic outputs must agree within this many bf16 steps (issue 27).
STEPS_ALLOWED = 2.0
CASE_NAMES = set(cases(Path("models"), Path("models32")))


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
    #: min, max over tensors of (share of elements wb changed from the base) / (share mk changed)
    changed_share_ratio: tuple[float, float]
    within_bf16_rounding: bool  # max_steps within STEPS_ALLOWED
    seconds: tuple[float, float]  # mergekit, workbench wall time (whole process)
    #: share of elements equal to the float64 result rounded once, and the largest distance from that
    #: result in bf16 steps: (mergekit share, workbench share, mergekit steps, workbench steps), or None
    exact_share: tuple[float, float, float, float] | None = None

    @property
    def verdict(self) -> str:
        if not self.deterministic:
            return "random masks differ by design"
        if self.within_bf16_rounding:
            return "within 2 bf16 steps"
        # correctly rounded: within half a step of the float64 result (0.51: its own float error)
        if self.exact_share and self.exact_share[3] <= 0.51 and self.exact_share[2] > STEPS_ALLOWED:
            return "workbench exact; mergekit off the float64 result"
        return "**differs**"


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


def split_variance_ties(taus: list[torch.Tensor], topk: float) -> torch.Tensor:
    """sce's cut: entries whose variance across the task vectors equals the k-th largest one when
    the cut falls inside a group of equal variances (mergekit's topk picks among them arbitrarily)."""
    var = torch.var(torch.stack([t.float() for t in taus]), dim=0, unbiased=False).reshape(-1)
    split = torch.zeros(var.numel(), dtype=torch.bool)
    k = int(int(torch.count_nonzero(var)) * topk)
    if topk >= 1 or k == 0:
        return split.reshape(taus[0].shape)
    ordered = torch.sort(var, descending=True).values
    if k < var.numel() and ordered[k - 1] == ordered[k]:
        split |= var == ordered[k]
    return split.reshape(taus[0].shape)


def excluded(
    recipe: dict[str, Any], base: dict[str, torch.Tensor] | None, inputs: list[dict[str, torch.Tensor]]
):
    """name -> the elements excluded from the element-wise check (ties split by a top-k cut)."""
    method = recipe["merge_method"]
    cuts = magnitude_cuts(recipe)
    topk = recipe.get("parameters", {}).get("select_topk", 1.0) if method == "sce" else 1.0

    def mask(name: str) -> torch.Tensor:
        shape = (base or inputs[0])[name].shape
        ties = torch.zeros(shape, dtype=torch.bool)
        if base is None:
            return ties
        for model, (density, gamma) in zip(inputs, cuts):
            ties |= split_ties(model[name].float() - base[name].float(), density, gamma)
        if topk < 1:
            ties |= split_variance_ties([m[name].float() - base[name].float() for m in inputs], topk)
        return ties

    return mask


def compare(
    mergekit_out: Path,
    workbench_out: Path,
    base: dict[str, torch.Tensor] | None,
    excluded_at: Any,
) -> dict[str, Any]:
    """Element-wise differences of two outputs over every tensor; names and shapes must agree.

    ``excluded_at(name)``: the elements left out of the element-wise figures (split ties).
    """
    mk, wb = load_outputs(mergekit_out), load_outputs(workbench_out)
    if set(mk) != set(wb):
        raise SystemExit(
            f"tensor names differ: only mergekit {sorted(set(mk) - set(wb))}, "
            f"only workbench {sorted(set(wb) - set(mk))}"
        )
    max_abs, max_steps, differing, tied, total = 0.0, 0.0, 0, 0, 0
    ratios, changed = [], []
    for name, a in mk.items():
        b = wb[name]
        if a.shape != b.shape:
            raise SystemExit(f"{name}: shape {tuple(a.shape)} (mergekit) vs {tuple(b.shape)} (workbench)")
        ties = (
            excluded_at(name) if base is not None and name in base else torch.zeros(a.shape, dtype=torch.bool)
        )
        diff = (a.float() - b.float()).abs()
        if not bool(ties.all()):
            max_abs = max(max_abs, float(diff[~ties].max()))
            max_steps = max(max_steps, float(steps(a, b)[~ties].max()))
        differing += int((diff > 0).sum())
        tied += int(ties.sum())
        total += diff.numel()
        if base is None or name not in base:
            continue
        reference = base[name].float()
        mk_delta = float((a.float() - reference).abs().sum())
        if mk_delta > 0:
            ratios.append(float((b.float() - reference).abs().sum()) / mk_delta)
        mk_changed = int((a.float() != reference).sum())
        if mk_changed:
            changed.append(int((b.float() != reference).sum()) / mk_changed)
    return {
        "tensors": len(mk),
        "max_abs_diff": max_abs,
        "max_steps": max_steps,
        "differing_share": differing / max(total, 1),
        "tie_share": tied / max(total, 1),
        "delta_l1_ratio": (min(ratios), max(ratios)) if ratios else (math.nan, math.nan),
        "changed_share_ratio": (min(changed), max(changed)) if changed else (math.nan, math.nan),
    }


def reference_merge(kind: str, recipe: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]):
    """The float64 result of a ``reference`` case, tensor by tensor (constant parameters only)."""
    models = [weights[m["model"]] for m in recipe["models"]]
    given = [m.get("parameters", {}).get("weight", 1.0) for m in recipe["models"]]
    base = weights[recipe["base_model"]] if "base_model" in recipe else None
    scale = recipe.get("parameters", {}).get("lambda", 1.0)

    def merged(name: str) -> torch.Tensor:
        xs = [m[name].double() for m in models]
        if kind == "linear":
            return sum(w * x for w, x in zip(given, xs)) / sum(given)
        if kind == "multislerp":
            return _multislerp(xs, None if base is None else base[name].double(), given)
        b = base[name].double()
        taus = [x - b for x in xs]
        if kind == "arcee_fusion":  # importance |x - b| * KL per row, Tukey's fence over the tensor
            rows_x, rows_b = xs[0].reshape(-1, xs[0].shape[-1]), b.reshape(-1, b.shape[-1])
            p, q = rows_x.softmax(-1) + 1e-8, rows_b.softmax(-1) + 1e-8
            kl = (p * (p / q).log()).sum(-1, keepdim=True)
            importance = ((rows_x - rows_b).abs() * kl).reshape(-1)
            ordered = importance.sort().values
            q1, median, q3 = (ordered[int(f * (ordered.numel() - 1))] for f in (0.25, 0.5, 0.75))
            keep = (importance >= median + 1.5 * (q3 - q1)).reshape(b.shape)
            return b + taus[0] * keep
        if kind == "task_arithmetic":
            return b + scale * sum(w * t for w, t in zip(given, taus))
        # model_stock: t = N c / (1 + (N - 1) c), c the mean pairwise cosine (mergekit's 1e-6 floor)
        n = len(taus)
        flat = [t.reshape(-1) for t in taus]
        cos = [
            (flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()).clamp(min=1e-6)).clamp(-1, 1)
            for i in range(n)
            for j in range(i + 1, n)
        ]
        c = sum(cos) / len(cos)
        t = n * c / (1 + (n - 1) * c)
        return t * sum(xs) / n + (1 - t) * b

    return merged


def _multislerp(xs: list[torch.Tensor], base: torch.Tensor | None, weights: list[float]) -> torch.Tensor:
    """mergekit's barycentric slerp (normalize_weights true, eps 1e-8), in float64."""
    eps = 1e-8
    vs = [(x - base if base is not None else x).reshape(-1) for x in xs]
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    norms = torch.stack([v.norm() for v in vs])
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    length = tangent.norm() + eps
    result = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms * w).sum()
    result = result.view(xs[0].shape)
    return result + base if base is not None else result


def exact_shares(
    folder: Path, recipe: dict[str, Any], kind: str, weights: dict[str, dict[str, torch.Tensor]]
):
    """(mergekit, workbench): the share of elements equal to the float64 result rounded once, and the
    largest distance from it in bf16 steps."""
    mk, wb = load_outputs(folder / "mergekit"), load_outputs(folder / "workbench")
    merged = reference_merge(kind, recipe, weights)
    hits, worst, total = [0, 0], [0.0, 0.0], 0
    for name, a in mk.items():
        if not a.is_floating_point():
            continue
        exact = merged(name)
        expected = exact.to(a.dtype)
        for i, out in enumerate((a, wb[name])):
            hits[i] += int((out == expected).sum())
            worst[i] = max(worst[i], float(steps(out, exact).max()))
        total += a.numel()
    return hits[0] / total, hits[1] / total, worst[0], worst[1]


def load_outputs(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (a merge's output, or an input model)."""
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
    if method not in MAGNITUDE_METHODS or "models" not in recipe:
        return []
    return [
        (m["parameters"].get("density", 1.0), m["parameters"].get("gamma", MAGNITUDE_METHODS[method]))
        for m in recipe["models"]
    ]


def _chosen(name: str, only: list[str] | None) -> bool:
    """Every case without ``--only``; else those named exactly, or containing a given text that names
    no case exactly."""
    return only is None or any(name == o for o in only) or any(o in name for o in only if o not in CASE_NAMES)


def run(venv: Path, work: Path, size: str = "tiny", only: list[str] | None = None) -> list[Comparison]:
    from workbench.checkpoint.synthetic import write_family

    mergekit_yaml = ensure_mergekit(venv)
    models, models32 = work / f"models-{size}", work / f"models32-{size}"
    selected = {
        (index, name): case
        for index, (name, case) in enumerate(cases(models, models32).items())
        if _chosen(name, only)
    }
    families = [(models, "bfloat16")]
    if any(str(models32) in yaml.safe_dump(case.recipe) for case in selected.values()):
        families.append((models32, "float32"))  # only when a selected case reads them
    for folder, dtype in families:
        if not (folder / "ft3" / "config.json").is_file():
            write_family(folder, size, 3, dtype=dtype)
    weights = {
        str(folder): load_outputs(folder) for family, _ in families for folder in sorted(family.iterdir())
    }
    workbench = [sys.executable, "-m", "workbench"]
    results = []
    for (index, name), case in selected.items():
        recipe = case.recipe
        folder = work / f"{size}-case{index:02d}"
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
        figures = compare(folder / "mergekit", folder / "workbench", base, excluded(recipe, base, inputs))
        within = figures["max_steps"] <= STEPS_ALLOWED
        exact = exact_shares(folder, recipe, case.reference, weights) if case.reference else None
        result = Comparison(
            name,
            case.deterministic,
            within_bf16_rounding=within,
            seconds=(mk_seconds, wb_seconds),
            exact_share=exact,
            **figures,
        )
        results.append(result)
        accuracy = (
            f"  exact: mergekit {100 * exact[0]:.1f}% (worst {exact[2]:.1f} steps), "
            f"workbench {100 * exact[1]:.1f}% (worst {exact[3]:.1f} steps)"
            if exact
            else ""
        )
        print(
            f"{name:58s} max |diff| {figures['max_abs_diff']:.3g} ({figures['max_steps']:.2f} steps)"
            f"  {result.verdict}{accuracy}",
            flush=True,
        )
    return results


def markdown(results: list[Comparison]) -> str:
    lines = [
        "| recipe | max abs difference | max bf16 steps | elements differing | split ties (excluded) | "
        "‖Δ‖₁ workbench / mergekit | changed share workbench / mergekit | float64 result exactly rounded "
        "(mergekit / workbench) | seconds (mergekit / workbench) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ties = f"{100 * r.tie_share:.2f}%" if r.tie_share else "none"
        ratios = [
            "n/a" if math.isnan(lo) else f"{lo:.4f}-{hi:.4f}"
            for lo, hi in (r.delta_l1_ratio, r.changed_share_ratio)
        ]
        exact = (
            f"{100 * r.exact_share[0]:.1f}% / {100 * r.exact_share[1]:.1f}% "
            f"(worst {r.exact_share[2]:.1f} / {r.exact_share[3]:.1f} steps)"
            if r.exact_share
            else ""
        )
        lines.append(
            f"| {r.case} | {r.max_abs_diff:.3g} | {r.max_steps:.2f} | {100 * r.differing_share:.2f}% | {ties} | "
            f"{ratios[0]} | {ratios[1]} | {exact} | {r.seconds[0]:.1f} / {r.seconds[1]:.1f} | {r.verdict} |"
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
    parser.add_argument("--size", default="tiny", help="generated model size (tiny, 60m, ...)")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        help="run only this case (its exact name, or a text its name contains); may be repeated",
    )
    args = parser.parse_args()
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="workbench-parity-") as tmp:
            results = run(args.venv, Path(tmp), args.size, args.only)
    else:
        results = run(args.venv, args.work, args.size, args.only)
    print()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if any(r.verdict == "**differs**" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
