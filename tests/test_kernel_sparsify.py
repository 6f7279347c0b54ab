"""The task-vector primitives of kernels/sparsify.py on hand-made tensors, and the merge of
kernels/task_vector_merge.py: reference vs streaming.

Expected values are written out by hand (or computed here in float64 with Python sorting), never
taken from the module under test.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from merging import documented_hash

from workbench_kernels.sparsify import (
    KEEP_ALL,
    KEEP_NONE,
    MagnitudeBand,
    TaskVector,
    band_mask,
    disjoint_merge,
    elect_sign,
    keep_count,
    l1_norm,
    magnitude_band,
    random_mask,
    rescale_factor,
    sparsify,
)
from workbench_kernels.task_vector_merge import (
    merge_task_vectors,
    merge_task_vectors_reference,
    merge_task_vectors_torch,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def kept(tau: torch.Tensor, band: MagnitudeBand) -> list[float]:
    mask = band_mask(tau, band)
    return (tau if mask is None else tau * mask).tolist()


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Counting and thresholds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fraction, n, expected",
    [(0.29, 100, 29), (0.5, 5, 2), (0.0, 7, 0), (1.0, 7, 7), (0.7, 10, 7), (0.999, 10, 9)],
)
def test_keep_count_is_floor_without_float_artefacts(fraction, n, expected):
    assert keep_count(fraction, n) == expected


def test_top_k_distinct_values():
    tau = t(0.5, -4.0, 3.0, -1.0, 2.0, 0.0)
    band = magnitude_band(tau, 0.5)  # k = 3: keep 4, 3, 2
    assert (band.lo, band.hi) == (2.0, math.inf)
    assert kept(tau, band) == [0.0, -4.0, 3.0, 0.0, 2.0, 0.0]


def test_ties_at_the_threshold_keep_exactly_k_earliest_first():
    """k = 3 of [3, -2, 2, 1, -2]: 3 and one of the three 2s; the earliest 2 ranks highest."""
    tau = t(3.0, -2.0, 2.0, 1.0, -2.0, 2.0)
    band = magnitude_band(tau, 0.5)
    assert band.lo == 2.0
    assert kept(tau, band) == [3.0, -2.0, 2.0, 0.0, 0.0, 0.0]


def test_a_band_computed_elsewhere_keeps_every_tie():
    """A threshold without tie ranges (e.g. model-wide) keeps all entries equal to it."""
    tau = t(3.0, -2.0, 2.0, 1.0, -2.0)
    assert kept(tau, MagnitudeBand(2.0)) == [3.0, -2.0, 2.0, 0.0, -2.0]


def test_density_one_keeps_all_and_zero_keeps_none():
    tau = t(1.0, -2.0, 3.0)
    assert magnitude_band(tau, 1.0) == KEEP_ALL
    assert magnitude_band(tau, 1.0, gamma=0.5) == KEEP_ALL  # density 1 wins over gamma (mergekit)
    assert band_mask(tau, KEEP_ALL) is None
    assert magnitude_band(tau, 0.0) == KEEP_NONE
    assert magnitude_band(tau, 0.3) == KEEP_NONE  # floor(0.9) = 0 entries
    assert kept(tau, KEEP_NONE) == [0.0, 0.0, 0.0]
    assert magnitude_band(torch.zeros(0), 0.5) == KEEP_ALL  # nothing to trim


def test_breadcrumbs_band_drops_outliers_and_small_values():
    tau = t(1, -2, 3, -4, 5, -6, 7, -8, 9, -10)
    band = magnitude_band(tau, 0.5, gamma=0.2)  # drop 10 and 9, keep the next 5: 8..4
    assert (band.lo, band.hi) == (4.0, 8.0)
    assert kept(tau, band) == [0, 0, 0, -4, 5, -6, 7, -8, 0, 0]


def test_breadcrumbs_outliers_cut_down_to_reach_density():
    """density 0.9 of 10 keeps 9, so only 1 of the 2 requested outliers can go (mergekit's rule)."""
    tau = t(1, -2, 3, -4, 5, -6, 7, -8, 9, -10)
    band = magnitude_band(tau, 0.9, gamma=0.2)
    assert kept(tau, band) == [1, -2, 3, -4, 5, -6, 7, -8, 9, 0]


def test_breadcrumbs_gamma_below_one_element_keeps_the_top_k():
    """gamma * n < 1 drops no outlier: the k largest are kept (mergekit's slice [n_bot:-0] keeps none)."""
    tau = t(1, -2, 3, -4, 5)
    band = magnitude_band(tau, 0.4, gamma=0.1)
    assert kept(tau, band) == [0, 0, 0, -4, 5]


def test_breadcrumbs_ties_at_the_outlier_bound_drop_the_earliest():
    """Dropping the single largest of [5, 5, 4, 3, 2, 1]: the two 5s tie; the first ranks higher."""
    tau = t(5, -5, 4, 3, 2, 1)
    band = magnitude_band(tau, 0.5, gamma=1 / 6)  # n_top = 1, k = 3: ranks 1..3 -> the second 5, 4, 3
    assert (band.lo, band.hi) == (3.0, 5.0)
    assert kept(tau, band) == [0, -5, 4, 3, 0, 0]


def test_breadcrumbs_ties_at_both_bounds_and_one_magnitude():
    tau = t(2, 1, -2, 1, 2, 1, 2)  # descending ranks: 2 (0, 2, 4, 6), then 1 (1, 3, 5)
    assert kept(tau, magnitude_band(tau, 3 / 7, gamma=2 / 7)) == [0, 1, 0, 0, 2, 0, 2]  # ranks 2..4
    assert kept(tau, magnitude_band(tau, 2 / 7, gamma=1 / 7)) == [
        0,
        0,
        -2,
        0,
        2,
        0,
        0,
    ]  # ranks 1..2: lo == hi


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_threshold_matches_sorting(dtype):
    gen = torch.Generator().manual_seed(3)
    tau = torch.randn(37, 29, generator=gen).to(dtype)
    for density in (0.01, 0.2, 0.5, 0.99):
        k = keep_count(density, tau.numel())
        ordered = sorted((abs(float(v)) for v in tau.reshape(-1).tolist()), reverse=True)
        band = magnitude_band(tau, density)
        assert band.lo == ordered[k - 1]
        mask = band_mask(tau, band)
        assert mask is not None and int(mask.sum()) == k
        stable = sorted(range(tau.numel()), key=lambda i: -abs(float(tau.reshape(-1)[i])))
        assert sorted(torch.nonzero(mask.reshape(-1)).squeeze(1).tolist()) == sorted(stable[:k])


# --------------------------------------------------------------------------------------------------
# Random masks, norms, rescaling
# --------------------------------------------------------------------------------------------------


def test_random_mask_is_seeded_and_has_the_density():
    a = random_mask((300, 400), 0.3, seed=5)
    assert torch.equal(a, random_mask((300, 400), 0.3, seed=5))
    assert not torch.equal(a, random_mask((300, 400), 0.3, seed=6))
    assert abs(a.float().mean().item() - 0.3) < 0.01
    assert not random_mask((50,), 0.0, seed=1).any()
    assert random_mask((50,), 1.0, seed=1).all()


def test_random_mask_is_a_documented_function_of_the_seed():
    """Element i is kept when h(h(i ^ seed_lo) ^ seed_hi) >> 8 < round(density * 2**24), also past
    the first block of the torch path."""
    seed = 0xDEADBEEF12345678
    lo, hi = seed % 2**32, seed // 2**32
    n = (1 << 16) + 1234
    keep_below = round(0.6 * 2**24)
    positions = list(range(0, 50)) + list(range(n - 50, n))
    mask = random_mask((n,), 0.6, seed=seed).tolist()
    assert [mask[i] for i in positions] == [
        (documented_hash(documented_hash(i ^ lo) ^ hi) >> 8) < keep_below for i in positions
    ]


def test_random_mask_and_l1_norm_do_not_depend_on_threads(threads):
    x = torch.randn(3_000_001, generator=torch.Generator().manual_seed(1))
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append((random_mask((3_000_001,), 0.25, seed=9), l1_norm(x)))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    assert math.isclose(results[0][1], float(x.double().abs().sum()), rel_tol=1e-12)


def test_rescale_factors():
    tau = t(1.0, -3.0, 0.5, -0.5)
    kept_ = t(0.0, -3.0, 0.0, 0.0)
    assert rescale_factor(tau, kept_, "l1", 0.25) == pytest.approx(5.0 / 3.0)
    assert rescale_factor(tau, kept_, "inverse_density", 0.25) == 4.0
    assert rescale_factor(tau, torch.zeros(4), "l1", 0.25) == 1.0  # nothing kept: nothing to scale
    assert rescale_factor(tau, kept_, "inverse_density", 0.0) == 1.0


def test_sparsify_l1_rescale_matches_the_original_norm():
    tau = t(1.0, -3.0, 0.5, -0.5, 2.0)
    out = sparsify(tau.clone(), TaskVector(weight=1.0, density=0.4, sparsify="magnitude", rescale="l1"))
    # keep -3 and 2 (L1 5), scale to the original L1 of 7
    assert out.tolist() == pytest.approx([0.0, -3.0 * 7 / 5, 0.0, 0.0, 2.0 * 7 / 5])


# --------------------------------------------------------------------------------------------------
# Sign election and disjoint merge
# --------------------------------------------------------------------------------------------------


def test_sign_election_by_mass_and_zero_sum_goes_positive():
    deltas = [t(1.0, -1.0, 2.0, 0.0, -1.0), t(-3.0, 1.0, 1.0, 0.0, -1.0)]
    assert elect_sign(deltas).tolist() == [False, True, True, True, False]


def test_disjoint_merge_averages_only_agreeing_nonzero_entries():
    d1, d2, d3 = t(1.0, -2.0, 0.0, 4.0), t(3.0, 1.0, 0.0, -1.0), t(-1.0, -1.0, 0.0, 0.0)
    positive = elect_sign([d1, d2, d3])  # sums 3, -2, 0, 3 -> +, -, +, +
    assert positive.tolist() == [True, False, True, True]
    mean = disjoint_merge([d1, d2, d3], [1.0, 1.0, 1.0], positive, normalize=True)
    assert mean.tolist() == [2.0, -1.5, 0.0, 4.0]
    total = disjoint_merge([d1, d2, d3], [1.0, 1.0, 1.0], positive, normalize=False)
    assert total.tolist() == [4.0, -3.0, 0.0, 4.0]
    # With weights, the divisor is the summed weight of the agreeing models (mergekit).
    # Weighted deltas [2, -4, 0, 8], [3, 1, 0, -1], [-1, -1, 0, 0]: sums 4, -4, 0, 7.
    weighted = disjoint_merge([d1 * 2, d2, d3], [2.0, 1.0, 1.0], elect_sign([d1 * 2, d2, d3]), normalize=True)
    assert weighted.tolist() == pytest.approx([5.0 / 3.0, -5.0 / 3.0, 0.0, 4.0])


# --------------------------------------------------------------------------------------------------
# Whole merges: reference vs streaming, bit for bit
# --------------------------------------------------------------------------------------------------

CASES = [
    ("magnitude", False, True, None, 0.0),
    ("magnitude", True, True, None, 0.0),
    ("magnitude", True, False, "l1", 0.0),
    ("magnitude", False, False, None, 0.05),
    ("magnitude", True, True, "inverse_density", 0.1),
    ("random", False, False, "l1", 0.0),
    ("random", True, False, "l1", 0.0),
    ("random", True, True, "inverse_density", 0.0),
    ("none", False, True, None, 0.0),
    ("none", True, False, None, 0.0),
]


@pytest.mark.parametrize("sparsify_kind, consensus, normalize, rescale, gamma", CASES)
@pytest.mark.parametrize(
    "dtype, compute",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float32, torch.float64)],
)
def test_streaming_path_is_bit_identical_to_the_reference(
    sparsify_kind, consensus, normalize, rescale, gamma, dtype, compute
):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(61, 47, generator=gen).to(dtype)
    tensors = [
        (base.double() + 0.1 * torch.randn(61, 47, generator=gen, dtype=torch.float64)).to(dtype)
        for _ in range(4)
    ]
    weights, densities = [1.0, 0.5, 0.0, -0.7], [0.3, 0.9, 0.5, 0.6]
    specs = [
        TaskVector(w, d, sparsify_kind, gamma, rescale, seed=100 + i)
        for i, (w, d) in enumerate(zip(weights, densities))
    ]
    kwargs: dict[str, Any] = {
        "consensus": consensus,
        "normalize": normalize,
        "scale": 0.8,
        "compute_dtype": compute,
    }
    ref = merge_task_vectors_reference(base, tensors, specs, **kwargs)
    fast = merge_task_vectors_torch(base, tensors, specs, **kwargs, out_dtype=compute)
    assert ref.dtype == fast.dtype == compute
    assert torch.equal(ref, fast)


def test_dispatcher_honours_workbench_kernels(monkeypatch):
    base = torch.zeros(3)
    tensors = [t(1.0, -2.0, 3.0)]
    specs = [TaskVector(1.0, 0.5, "magnitude")]
    for impl in ("reference", "torch"):
        monkeypatch.setenv("WORKBENCH_KERNELS", impl)
        out = merge_task_vectors(
            base, tensors, specs, consensus=True, normalize=True, scale=1.0, out_dtype=torch.bfloat16
        )
        assert out.dtype == torch.bfloat16 and out.tolist() == [0.0, 0.0, 3.0]


def test_linear_normalize_with_zero_weight_sum_is_refused():
    with pytest.raises(ValueError, match="sum to 0"):
        merge_task_vectors_torch(
            torch.zeros(2),
            [t(1.0, 2.0), t(3.0, 4.0)],
            [TaskVector(1.0, 0.5, "random"), TaskVector(-1.0, 0.5, "random")],
            consensus=False,
            normalize=True,
            scale=1.0,
        )


def test_precomputed_band_replaces_the_per_tensor_top_k():
    tau = t(0.1, -0.6, 0.5, 2.0)
    spec = TaskVector(1.0, density=0.25, sparsify="magnitude", band=MagnitudeBand(0.5))
    assert sparsify(tau.clone(), spec).tolist() == [0.0, pytest.approx(-0.6), 0.5, 2.0]
