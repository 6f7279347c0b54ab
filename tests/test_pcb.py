"""PCB-merging: a hand-worked case, the released code transcribed in float64, the engine, properties.

``pcb_reference`` below follows ``pcb-merging.py::PCB_merge`` / ``task_para_att_merge`` line by
line on an (n, d) matrix of flattened task vectors (sort, index at int(d * ratio), min-max
normalise), in float64, independently of the plugin. The plugin computes its selection scores in
float32, so an entry whose score lies within float32 rounding of its task's drop threshold may be
kept by one and dropped by the other; such entries are identified from the reference and may
differ (they are a tiny fraction, counted).
"""

from __future__ import annotations

import math

import pytest
import torch
from merging import load_dir, merge, q

from workbench.method import TensorContext
from workbench_kernels.order_stats import RadixSelect, kth_smallest
from workbench_plugins.methods.pcb import PCB, PCBModelParameters, PCBParameters

AMBIGUOUS = 1e-5  # relative distance of a score to its threshold below which float32 may decide otherwise


def pcb_reference(
    tvs: torch.Tensor, ratio: float, clip: float, inter: str = "sum", lams: list[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged task vector, ambiguous-entry mask) for an (n, d) float64 matrix, as the released code."""
    n, d = tvs.shape
    absv = tvs.abs()
    s = absv.sort(dim=1).values
    lo, hi = s[:, int(d * clip)].unsqueeze(1), s[:, int(d * (1 - clip) - 1)].unsqueeze(1)
    a = torch.clamp(absv, lo, hi)
    clipped = torch.sign(tvs) * a
    normed = (a - a.min(dim=1, keepdim=True).values) / (
        a.max(dim=1, keepdim=True).values - a.min(dim=1, keepdim=True).values
    )
    intra = torch.exp(n * normed**2)
    if inter == "sum":
        cross = tvs * tvs.sum(dim=0)
    else:
        cross = tvs * (torch.sign(tvs) * normed).sum(dim=0)
    beta = intra * torch.tanh(cross)
    sb = beta.sort(dim=1).values
    thr = sb[:, int(d * (1 - ratio))].unsqueeze(1)
    c = torch.clamp(beta, thr, sb[:, -1:])
    scale = (c - c.min(dim=1, keepdim=True).values) / (
        c.max(dim=1, keepdim=True).values - c.min(dim=1, keepdim=True).values
    )
    w = torch.tensor(lams or [1.0] * n, dtype=torch.float64).unsqueeze(1)
    merged = (clipped * w * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)
    ambiguous = ((beta - thr).abs() <= AMBIGUOUS * thr.abs().clamp(min=1e-30)).any(dim=0)
    return merged, ambiguous


def ctx(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> TensorContext:
    return TensorContext(
        name="w",
        layer_index=None,
        layer_count=1,
        module_kind="other",
        shape=shape,
        device="cpu",
        compute_dtype=dtype,
        out_dtype=dtype,
        seed=0,
    )


def apply(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float] | None = None,
    dtype: torch.dtype = torch.float64,
    **params,
) -> torch.Tensor:
    if "scale" in params:
        params["lambda"] = params.pop("scale")
    p = PCBParameters.model_validate({"scope": "per_tensor", **params})
    mp = [PCBModelParameters(weight=w) for w in (weights or [1.0] * len(models))]
    return PCB().apply(models, base, p, mp, ctx(tuple(base.shape), dtype))


def check(
    out_tv: torch.Tensor, ref: torch.Tensor, ambiguous: torch.Tensor, scale: torch.Tensor, rtol: float = 1e-4
) -> int:
    """out_tv matches ref except at ambiguous entries; returns how many ambiguous entries differ."""
    ok = (out_tv.double() - ref).abs() <= rtol * scale + 1e-9
    bad = ~ok & ~ambiguous
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} entries off, worst {(out_tv.double() - ref).abs()[bad].max().item():.3g}"
    )
    return int((~ok & ambiguous).sum())


# --------------------------------------------------------------------------------------------------
# Hand-worked and small-tensor reference cases
# --------------------------------------------------------------------------------------------------


def test_single_task_hand_worked() -> None:
    """tau = (1, -2, 3, 4), q = 0 (no clipping), r = 0.5. Norm|tau| = (0, 1/3, 2/3, 1); scores
    exp(n^2) * tanh(tau^2) increase along the entries; the drop threshold is sorted(score)[int(4 * 0.5)]
    = the third, so only the largest survives: d - int(d (1 - r)) - 1 = 1 entry, not ceil(r d) = 2."""
    base = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    x = base + torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
    out = apply(base, [x], pcb_ratio=0.5, clip_ratio=0.0)
    assert torch.equal(out, torch.tensor([0.5, 0.5, 0.5, 4.5], dtype=torch.float64))
    # lambda scales the merged task vector; the per-task weight scales the task's values, not its share.
    out = apply(base, [x], weights=[2.0], pcb_ratio=0.5, clip_ratio=0.0, scale=0.5)
    assert torch.equal(out, torch.tensor([0.5, 0.5, 0.5, 4.5], dtype=torch.float64))


def test_two_tasks_hand_worked() -> None:
    """tau1 = (2, 1, 0, 1), tau2 = (2, -1, 1, 0), q = 0, r = 1 (nothing dropped but each task's minimum).
    Norm|tau_i| = |tau_i| / 2; consensus sum = (4, 0, 1, 1); scores s_i = exp(2 n^2) tanh(tau_i * sum)."""
    base = torch.zeros(4, dtype=torch.float64)
    t1 = torch.tensor([2.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    t2 = torch.tensor([2.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    out = apply(base, [t1, t2], pcb_ratio=1.0, clip_ratio=0.0)
    e = math.exp
    s1 = [e(2) * math.tanh(8), 0.0, 0.0, e(0.5) * math.tanh(1)]  # entry 1: tanh(1 * 0) = 0
    s2 = [e(2) * math.tanh(8), 0.0, e(0.5) * math.tanh(1), 0.0]

    def rescale(s: list[float]) -> list[float]:
        lo, hi = min(s), max(s)
        return [(v - lo) / (hi - lo) for v in s]

    b1, b2 = rescale(s1), rescale(s2)
    expected = [(b1[k] * t1[k] + b2[k] * t2[k]) / max(b1[k] + b2[k], 1e-12) for k in range(4)]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-12)
    # entry 0: both agree fully -> 2; entry 1: cancelling, dropped -> 0; entries 2, 3: the one non-zero task.
    assert torch.allclose(out, torch.tensor([2.0, 0.0, 1.0, 1.0], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("inter", ["sum", "normalized"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_random_tensors_match_released_code(n, inter) -> None:
    g = torch.Generator().manual_seed(n)
    base = torch.randn(300, 7, generator=g, dtype=torch.float64)
    models = [base + 0.01 * torch.randn(300, 7, generator=g, dtype=torch.float64) for _ in range(n)]
    lams = [1.0, 0.7, 1.3, 2.0][:n]
    out = apply(base, models, weights=lams, pcb_ratio=0.2, clip_ratio=0.01, inter=inter, scale=1.5)
    tvs = torch.stack([(m - base).reshape(-1) for m in models])
    ref, amb = pcb_reference(tvs, 0.2, 0.01, inter, lams)
    differing = check((out - base).reshape(-1), 1.5 * ref, amb, tvs.abs().sum(0) * 2)
    assert differing <= 5


def test_kept_entries_per_task() -> None:
    """One task, continuous values (no ties): exactly d - int(d (1 - r)) - 1 entries move."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(1000, dtype=torch.float64)
    x = torch.randn(1000, generator=g, dtype=torch.float64)
    for r in (0.05, 0.1, 0.37):
        out = apply(base, [x], pcb_ratio=r, clip_ratio=0.01)
        assert int((out != 0).sum()) == 1000 - int(1000 * (1 - r)) - 1
        # N = 1: where kept, the merge returns the clipped task vector itself.
        kept = out != 0
        s = x.abs().sort().values
        clipped = torch.sign(x) * x.abs().clamp(s[int(1000 * 0.01)], s[int(1000 * 0.99 - 1)])
        assert torch.allclose(out[kept], clipped[kept], rtol=1e-6, atol=0)  # clip bounds are float32


def test_r_one_keeps_all_but_the_lowest_score() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    out = apply(torch.zeros(50, dtype=torch.float64), [x], pcb_ratio=1.0, clip_ratio=0.0)
    assert int((out == 0).sum()) == 1
    assert torch.allclose(out[out != 0], x[out != 0], rtol=1e-6, atol=0)  # clip bounds are float32


def test_weight_zero_removes_the_model() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 5, generator=g, dtype=torch.float64)
    a, b = (base + 0.1 * torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in range(2))
    alone = apply(base, [a])
    assert torch.equal(apply(base, [a, b], weights=[1.0, 0.0]), alone)
    assert torch.equal(apply(base, [b, a], weights=[0.0, 1.0]), alone)
    assert torch.equal(apply(base, [a, b], weights=[0.0, 0.0]), base)


def test_degenerate_inputs_give_the_base_not_nan() -> None:
    """Zero task vectors and a single-element tensor: the released code would divide 0 by 0."""
    base = torch.ones(6, dtype=torch.float64)
    assert torch.equal(apply(base, [base.clone(), base.clone()]), base)
    one = torch.tensor([2.0], dtype=torch.float64)
    assert torch.equal(
        apply(torch.tensor([1.0], dtype=torch.float64), [one]), torch.tensor([1.0], dtype=torch.float64)
    )


# --------------------------------------------------------------------------------------------------
# Order statistics kernel
# --------------------------------------------------------------------------------------------------


def test_radix_select_matches_sort() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.cat(
        [
            torch.randn(20000, generator=g),
            torch.zeros(100),
            -torch.zeros(7),
            torch.randn(300, generator=g).bfloat16().float(),
            torch.tensor([1e-42, -1e-42, 3e38, -3e38]),
        ]
    )
    ranks = [0, 1, 99, 5000, 10050, x.numel() - 2, x.numel() - 1]
    select = RadixSelect(ranks)
    chunks = list(x.split(4097))
    for c in chunks:
        select.coarse(c)
    select.start_fine()
    for c in reversed(chunks):  # any order and chunking of the same values
        select.fine(c)
    expected = x.sort().values
    assert select.values() == [expected[k].item() for k in ranks]
    assert kth_smallest(x, ranks) == [expected[k].item() for k in ranks]


# --------------------------------------------------------------------------------------------------
# Through the engine
# --------------------------------------------------------------------------------------------------


def _flat(weights: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([weights[n].double().reshape(-1) for n in names])


@pytest.mark.parametrize("inter", ["sum", "normalized"])
def test_global_scope_matches_released_code_on_the_flattened_model(
    tmp_path, tiny_family, monkeypatch, inter
) -> None:
    """Whole-model ranking (the released code's flattening), with the engine's row blocks and the
    statistics passes forced to stream in small blocks."""
    import workbench.engine.runner as engine
    import workbench_plugins.methods.pcb as pcb

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3000)
    monkeypatch.setattr(pcb, "BLOCK_ELEMENTS", 5000)
    rows_seen = []
    original = pcb.PCB.apply

    def spy(self, tensors, base, params, model_params, ctx):
        rows_seen.append(ctx.rows)
        return original(self, tensors, base, params, model_params, ctx)

    monkeypatch.setattr(pcb.PCB, "apply", spy)
    out = merge(
        tmp_path,
        f"""
method: pcb
base: {q(tiny_family["base"])}
models:
  - model: {q(tiny_family["ft1"])}
    parameters: {{weight: 1.2}}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 0.8}}
parameters: {{pcb_ratio: 0.1, clip_ratio: 0.01, inter: {inter}, lambda: 1.5}}
output: {{dtype: float32}}
""",
    )
    w = {k: load_dir(p) for k, p in tiny_family.items()}
    names = sorted(w["base"])
    base = _flat(w["base"], names)
    tvs = torch.stack([_flat(w[k], names) - base for k in ("ft1", "ft2")])
    ref, amb = pcb_reference(tvs, 0.1, 0.01, inter, [1.2, 0.8])
    got = _flat(out, names) - base
    differing = check(got, 1.5 * ref, amb, 3 * tvs.abs().sum(0) + 1e-5 * base.abs())
    assert differing < 1e-4 * base.numel()
    assert any(r is not None for r in rows_seen)  # global scope merges in row blocks
    moved = got != 0
    assert 0.1 * base.numel() < int(moved.sum()) < 0.2 * base.numel()  # about r d per task, some shared


def test_per_tensor_scope_ranks_within_each_tensor(tmp_path, tiny_family) -> None:
    out = merge(
        tmp_path,
        f"""
method: pcb
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
parameters: {{scope: per_tensor, pcb_ratio: 0.2}}
output: {{dtype: float32}}
""",
    )
    w = {k: load_dir(p) for k, p in tiny_family.items()}
    for name, b in w["base"].items():
        base = b.double().reshape(1, -1)
        tvs = torch.cat([w[k][name].double().reshape(1, -1) - base for k in ("ft1", "ft2")])
        ref, amb = pcb_reference(tvs, 0.2, 0.01)
        check(out[name].double().reshape(-1) - base[0], ref, amb, 3 * tvs.abs().sum(0) + 1e-5 * base[0].abs())


def test_bf16_output_and_permutation_invariance(tmp_path, tiny_family) -> None:
    a = merge(
        tmp_path,
        f"""
method: pcb
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft1"])}, {q(tiny_family["ft2"])}]
""",
        "a",
    )
    b = merge(
        tmp_path,
        f"""
method: pcb
base: {q(tiny_family["base"])}
models: [{q(tiny_family["ft2"])}, {q(tiny_family["ft1"])}]
""",
        "b",
    )
    base = load_dir(tiny_family["base"])
    for name in base:
        assert a[name].dtype == torch.bfloat16
        assert torch.equal(a[name], b[name]), name


def test_weight_zero_through_the_engine(tmp_path, tiny_family) -> None:
    """A zero-weight model leaves the whole merge, model-wide statistics included."""
    alone = merge(
        tmp_path, f"method: pcb\nbase: {q(tiny_family['base'])}\nmodels: [{q(tiny_family['ft1'])}]\n", "alone"
    )
    both = merge(
        tmp_path,
        f"""
method: pcb
base: {q(tiny_family["base"])}
models:
  - {q(tiny_family["ft1"])}
  - model: {q(tiny_family["ft2"])}
    parameters: {{weight: 0.0}}
""",
        "both",
    )
    for name in alone:
        assert torch.equal(alone[name], both[name]), name
