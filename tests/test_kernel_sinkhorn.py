"""The log-domain Sinkhorn kernel: reference, row-blocked torch path and Triton kernel (under the
interpreter on CPU) against POT's ``ot.sinkhorn`` (the independent check) and against the
marginals, which every plan must meet."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import ot
import pytest
import torch

from workbench_kernels.sinkhorn import sinkhorn, sinkhorn_reference, sinkhorn_torch, sinkhorn_triton

IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": sinkhorn_reference,
    "torch": sinkhorn_torch,
    "triton": sinkhorn_triton,
}


def _problem(
    n: int, m: int, uniform: bool, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Marginals and a ground cost as OT fusion builds it: Euclidean distances divided by their maximum."""
    gen = torch.Generator().manual_seed(seed)
    x, y = (
        torch.rand(n, 4, generator=gen, dtype=torch.float64),
        torch.rand(m, 4, generator=gen, dtype=torch.float64),
    )
    cost = torch.cdist(x, y)
    cost /= cost.max() if cost.max() > 0 else 1.0
    if uniform:
        a, b = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)
    else:
        a, b = (
            torch.rand(n, generator=gen, dtype=torch.float64) + 0.1,
            torch.rand(m, generator=gen, dtype=torch.float64) + 0.1,
        )
        a, b = a / a.sum(), b / b.sum()
    return a.to(dtype), b.to(dtype), cost.to(dtype)


def _pot(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, **kwargs: object) -> np.ndarray:
    return ot.sinkhorn(a.double().numpy(), b.double().numpy(), cost.double().numpy(), reg, **kwargs)


def _assert_marginals(
    plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_tol: float, column_tol: float
) -> None:
    """Rows are exact after the last row update; columns within the stopping threshold (an L2 norm)."""
    assert bool(torch.isfinite(plan).all()) and bool((plan >= 0).all())
    assert (plan.double().sum(dim=1) - a.double()).abs().max().item() <= row_tol
    assert torch.linalg.vector_norm(plan.double().sum(dim=0) - b.double()).item() <= column_tol


SIZES = [(1, 1), (1, 7), (7, 33), (33, 7), (130, 33), (130, 130)]
# (n, m), uniform, reg: a few of the float64 cases again through the interpreter (~5 ms per launch)
TRITON_CASES = [
    ((1, 1), True, 0.5),
    ((7, 33), False, 0.05),
    ((33, 7), True, 0.5),
    ((130, 130), False, 0.5),
    ((130, 7), True, 0.05),
]


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
@pytest.mark.parametrize("reg", [0.05, 0.5])
def test_plans_match_pot(impl: str, size: tuple[int, int], uniform: bool, reg: float) -> None:
    a, b, cost = _problem(*size, uniform, seed=size[0] * 1000 + size[1])
    originals = (a.clone(), b.clone(), cost.clone())
    plan = IMPLS[impl](a, b, cost, reg)
    assert plan.dtype == torch.float64 and plan.shape == size
    np.testing.assert_allclose(plan.numpy(), _pot(a, b, cost, reg), rtol=1e-9, atol=1e-14)
    _assert_marginals(plan, a, b, 1e-13, 1e-9)
    assert all(torch.equal(x, x0) for x, x0 in zip((a, b, cost), originals))


@pytest.mark.parametrize(
    "size, uniform, reg",
    TRITON_CASES,
    ids=[f"{s[0]}x{s[1]}-{'uniform' if u else 'weighted'}-{r}" for s, u, r in TRITON_CASES],
)
def test_triton_plans_match_pot_and_reference(size: tuple[int, int], uniform: bool, reg: float) -> None:
    a, b, cost = _problem(*size, uniform, seed=size[0] * 1000 + size[1])
    plan = sinkhorn_triton(a, b, cost, reg)
    assert plan.dtype == torch.float64 and plan.shape == size
    np.testing.assert_allclose(plan.numpy(), _pot(a, b, cost, reg), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(
        plan.numpy(), sinkhorn_reference(a, b, cost, reg).numpy(), rtol=1e-12, atol=1e-15
    )
    _assert_marginals(plan, a, b, 1e-13, 1e-9)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_float32_costs(impl: str) -> None:
    """float32 costs are computed in float32: POT's threshold is out of reach, a looser one is not."""
    a, b, cost = _problem(33, 130, False, seed=3, dtype=torch.float32)
    plan = IMPLS[impl](a, b, cost, 0.5, tol=1e-6)
    assert plan.dtype == torch.float32
    expected = _pot(a, b, cost, 0.5)
    np.testing.assert_allclose(plan.numpy(), expected, rtol=2e-5, atol=1e-9)
    _assert_marginals(plan, a, b, 1e-6, 1e-6)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_transposed_cost_view(impl: str) -> None:
    a, b, cost = _problem(33, 7, False, seed=9)
    view = cost.T.contiguous().T  # same values, column-major
    assert not view.is_contiguous()
    np.testing.assert_allclose(
        IMPLS[impl](a, b, view, 0.5).numpy(), _pot(a, b, cost, 0.5), rtol=1e-9, atol=1e-14
    )


@pytest.mark.parametrize("max_iter", [1, 2, 10, 11, 12])
def test_same_schedule_as_pot_when_stopped_early(max_iter: int) -> None:
    """Stopped before convergence, the plans still agree: same update order, same checks."""
    a, b, cost = _problem(7, 33, False, seed=4)
    with pytest.warns(UserWarning, match="did not converge"):
        plan = sinkhorn_torch(a, b, cost, 0.05, max_iter=max_iter)
    np.testing.assert_allclose(
        plan.numpy(), _pot(a, b, cost, 0.05, numItermax=max_iter, warn=False), rtol=1e-10, atol=1e-15
    )


def _far_column_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One target point far from every source: its cost column is above 0.9 everywhere, so
    exp(-cost / 1e-3) underflows to 0 in float64."""
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.rand(7, 2, generator=gen, dtype=torch.float64),
        torch.rand(7, 2, generator=gen, dtype=torch.float64),
    )
    y[3] += 4.0
    cost = torch.cdist(x, y)
    cost /= cost.max()
    uniform = torch.full((7,), 1.0 / 7, dtype=torch.float64)
    return uniform, uniform.clone(), cost


def test_small_reg_where_pot_underflows() -> None:
    a, b, cost = _far_column_problem()
    reg = 1e-3
    assert bool((cost[:, 3] / reg > 800).all())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pot_plan = _pot(a, b, cost, reg)
    assert any("numerical errors" in str(w.message) for w in caught)
    assert np.abs(pot_plan.sum(axis=0) - b.numpy()).max() > 0.1  # POT gave up: its plan misses the marginals
    plans = {}
    for impl in ("reference", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # converges: no warning at all
            plans[impl] = IMPLS[impl](a, b, cost, reg, max_iter=10_000)
        _assert_marginals(plans[impl], a, b, 1e-13, 1e-9)
        assert plans[impl][:, 3].sum().item() == pytest.approx(
            1.0 / 7, abs=1e-9
        )  # the far point gets its mass
    np.testing.assert_allclose(plans["torch"].numpy(), plans["reference"].numpy(), rtol=1e-9, atol=1e-15)


def test_small_reg_triton_agrees_with_torch_path() -> None:
    """Fewer iterations through the interpreter: the same early-stopped plan as the torch path."""
    a, b, cost = _far_column_problem()
    with pytest.warns(UserWarning, match="did not converge"):
        plan = sinkhorn_triton(a, b, cost, 1e-3, max_iter=40)
    with pytest.warns(UserWarning, match="did not converge"):
        expected = sinkhorn_torch(a, b, cost, 1e-3, max_iter=40)
    assert bool(torch.isfinite(plan).all())
    np.testing.assert_allclose(plan.numpy(), expected.numpy(), rtol=1e-9, atol=1e-15)
    assert (plan.sum(dim=1) - a).abs().max().item() <= 1e-13


@pytest.mark.parametrize("impl", list(IMPLS))
def test_zero_marginal_entries(impl: str) -> None:
    """A point without mass gets an empty row, as in POT; the others still meet their marginals."""
    a, b, cost = _problem(7, 9, False, seed=6)
    a[2] = 0.0
    a /= a.sum()
    plan = IMPLS[impl](a, b, cost, 0.1)
    assert torch.equal(plan[2], torch.zeros(9, dtype=torch.float64))
    _assert_marginals(plan, a, b, 1e-13, 1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # POT divides by the zero mass
        np.testing.assert_allclose(plan.numpy(), _pot(a, b, cost, 0.1), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_arguments_are_refused(impl: str) -> None:
    a, b, cost = _problem(3, 4, True, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        IMPLS[impl](b, a, cost, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        IMPLS[impl](a, b, cost.reshape(-1), 0.1)
    with pytest.raises(ValueError, match="reg"):
        IMPLS[impl](a, b, cost, 0.0)


def test_dispatcher_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, cost = _problem(7, 7, True, seed=2)
    expected = _pot(a, b, cost, 0.5)
    for impl in IMPLS:
        monkeypatch.setenv("WORKBENCH_KERNELS", impl)
        np.testing.assert_allclose(sinkhorn(a, b, cost, 0.5).numpy(), expected, rtol=1e-9, atol=1e-14)
        with monkeypatch.context() as patch:  # and really calls the implementation it names
            patch.setattr(f"workbench_kernels.sinkhorn.sinkhorn_{impl}", lambda *args: torch.full((1,), 5.0))
            assert torch.equal(sinkhorn(a, b, cost, 0.5), torch.full((1,), 5.0))


def _independent_update(
    cost: torch.Tensor, other: torch.Tensor, log_marginal: torch.Tensor, reg: float
) -> np.ndarray:
    """reg · (log_marginal_i - log Σ_j exp((other_j - cost_ij) / reg)), with numpy, shifted by the
    row maximum (which the test data keep finite)."""
    x = (other.numpy()[None, :] - cost.numpy()) / reg
    peak = x.max(axis=1, keepdims=True)
    return reg * (log_marginal.numpy() - (np.log(np.exp(x - peak).sum(axis=1)) + peak[:, 0]))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("transposed", [False, True])
def test_blocked_updates_match_whole_row_sums(
    impl: str, transposed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small blocks: several row blocks (torch) or column blocks with the online max and sum
    (Triton), where a later column block holds each row's maximum and some potentials are -inf."""
    from workbench_kernels import sinkhorn as module

    gen = torch.Generator().manual_seed(12)
    cost = torch.rand(33, 130, generator=gen, dtype=torch.float64)
    cost[:, 100:] -= 0.5  # the largest terms come last
    if transposed:
        cost = cost.T.contiguous().T
    other = torch.rand(130, generator=gen, dtype=torch.float64) * 0.2
    other[[0, 17, 64]] = -float("inf")  # points without mass
    log_marginal = torch.log(torch.rand(33, generator=gen, dtype=torch.float64) + 0.1)
    expected = _independent_update(cost, other, log_marginal, 0.05)
    if impl == "torch":
        monkeypatch.setattr(module, "BLOCK", 300)  # two rows per block
        got = module.softmin_update_torch(cost, other, log_marginal, 0.05)
    else:
        got = module.softmin_update_triton(cost, other, log_marginal, 0.05, max_block_cols=16)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=1e-15)


def test_triton_plan_with_column_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole solve with 16-column tiles (both updates loop over several column blocks)."""
    import functools

    from workbench_kernels import sinkhorn as module

    a, b, cost = _problem(33, 130, False, seed=13)
    monkeypatch.setattr(
        module, "softmin_update_triton", functools.partial(module.softmin_update_triton, max_block_cols=16)
    )
    plan = sinkhorn_triton(a, b, cost, 0.5)
    np.testing.assert_allclose(plan.numpy(), _pot(a, b, cost, 0.5), rtol=1e-9, atol=1e-14)
    _assert_marginals(plan, a, b, 1e-13, 1e-9)
