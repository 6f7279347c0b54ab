"""Entropic optimal transport: Sinkhorn–Knopp iterations in the log domain.

The plan is P_ij = exp((f_i + g_j - M_ij) / reg) for potentials f, g, found by alternating
    g_j = reg log b_j - reg LSE_i((f_i - M_ij) / reg)     (columns: P^T 1 = b)
    f_i = reg log a_i - reg LSE_j((g_j - M_ij) / reg)     (rows:    P 1 = a)
POT's ``ot.sinkhorn`` (``sinkhorn_knopp``) runs the same iterations on the scalings u = exp(f / reg),
v = exp(g / reg) and K = exp(-M / reg), which underflow once M / reg passes ~745 (float64): it then
stops at its first iteration with a warning and a plan far from the marginals. The potentials never
underflow, so small ``reg`` works. The schedule and stopping rule are POT's, so that the plans agree
wherever POT does not underflow: the column update first, then the row update; on iterations 0, 10,
20, ... the column-marginal violation ||P^T 1 - b||_2 is measured after the row update, and the
iterations stop once it is below ``tol``. A warning says when ``max_iter`` iterations did not get there.

Only the log-sum-exp update differs between the implementations: the reference works on whole
matrices, the torch path on blocks of rows through one buffer (no other n×m temporary), and the
Triton kernel gives each program a block of rows, looping over column blocks with an online max and
sum. The column update is the row update of Mᵀ; M's strides are passed swapped, never copied.
Computed in M's dtype when it is float64, else in float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from workbench_kernels import block_size, implementation, interpreting, jit, tl

#: The iterations between two measurements of the marginal violation (POT's schedule).
CHECK_EVERY = 10
#: Elements of the torch path's buffer: one block of rows of M.
BLOCK = 1 << 18

#: ``update(cost, other, log_marginal, reg) -> potential``: the potential over ``cost``'s rows.
Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def softmin_update_reference(
    cost: torch.Tensor, other: torch.Tensor, log_marginal: torch.Tensor, reg: float
) -> torch.Tensor:
    """reg · (log_marginal_i - LSE_j((other_j - cost_ij) / reg)), on the whole matrix."""
    return reg * (log_marginal - torch.logsumexp((other[None, :] - cost) / reg, dim=1))


def softmin_update_torch(
    cost: torch.Tensor, other: torch.Tensor, log_marginal: torch.Tensor, reg: float
) -> torch.Tensor:
    """The same, a block at a time in one buffer (in place: subtract, scale, shift, exp). A
    column-major ``cost`` (the transposed view of the column update) is read by rows of its
    transpose, with a running max and sum per output, so that memory is read in order."""
    if cost.ndim == 2 and cost.shape[0] > 1 and cost.T.is_contiguous():
        return _softmin_columns(cost.T, other, log_marginal, reg)
    rows, cols = cost.shape
    out = torch.empty(rows, dtype=other.dtype, device=other.device)
    step = max(1, BLOCK // max(cols, 1))
    buffer = torch.empty((min(step, rows), cols), dtype=other.dtype, device=other.device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x = torch.sub(other[None, :], cost[start:stop], out=buffer[: stop - start]).div_(reg)
        shift = _finite_or_zero(x.amax(dim=1))  # an all -inf row keeps LSE = -inf
        lse = x.sub_(shift[:, None]).exp_().sum(dim=1).log_().add_(shift)
        out[start:stop] = reg * (log_marginal[start:stop] - lse)
    return out


def _softmin_columns(
    cost_t: torch.Tensor, other: torch.Tensor, log_marginal: torch.Tensor, reg: float
) -> torch.Tensor:
    """:func:`softmin_update_torch` of ``cost_t.T``: the sums run down the columns of ``cost_t``,
    a block of its rows at a time, rescaled whenever a block raises a column's maximum."""
    rows, cols = cost_t.shape  # the output has one entry per column
    step = max(1, BLOCK // max(cols, 1))
    buffer = torch.empty((min(step, rows), cols), dtype=other.dtype, device=other.device)
    running_max = torch.full((cols,), -math.inf, dtype=other.dtype, device=other.device)
    running_sum = torch.zeros(cols, dtype=other.dtype, device=other.device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x = torch.sub(other[start:stop, None], cost_t[start:stop], out=buffer[: stop - start]).div_(reg)
        new_max = torch.maximum(running_max, x.amax(dim=0))
        shift = _finite_or_zero(new_max)
        running_sum.mul_(torch.exp(running_max - shift)).add_(x.sub_(shift[None, :]).exp_().sum(dim=0))
        running_max = new_max
    lse = running_sum.log_().add_(_finite_or_zero(running_max))
    return reg * (log_marginal - lse)


def _finite_or_zero(peak: torch.Tensor) -> torch.Tensor:
    """The shift of a log-sum-exp: 0 where the maximum is -inf (all terms zero: exp(-inf - -inf) is NaN)."""
    return torch.where(torch.isfinite(peak), peak, 0.0)


@jit
def _softmin_update_kernel(
    cost_ptr,
    other_ptr,
    log_marginal_ptr,
    reg_ptr,
    out_ptr,
    rows,
    cols,
    stride_row,
    stride_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """One program per BLOCK_ROWS rows: an online max and sum of exp((other_j - cost_ij) / reg)
    over column blocks, then out_i = reg · (log_marginal_i - LSE_i). Computes in out's dtype; reg
    is read from memory so that it keeps that precision (a float argument would be float32)."""
    dtype = out_ptr.dtype.element_ty
    reg = tl.load(reg_ptr)
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    running_max = tl.full([BLOCK_ROWS], -float("inf"), dtype)
    running_sum = tl.zeros([BLOCK_ROWS], dtype)
    for col_start in range(0, cols, BLOCK_COLS):
        col = col_start + tl.arange(0, BLOCK_COLS)
        col_ok = col < cols
        other = tl.load(other_ptr + col, mask=col_ok, other=-float("inf")).to(dtype)
        cost = tl.load(
            cost_ptr + row[:, None] * stride_row + col[None, :] * stride_col,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(dtype)
        x = (other[None, :] - cost) / reg
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        shift = tl.where(new_max == -float("inf"), 0.0, new_max).to(dtype)  # exp(-inf - -inf) is NaN
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        running_max = new_max
    lse = tl.log(running_sum) + tl.where(running_max == -float("inf"), 0.0, running_max).to(dtype)
    log_marginal = tl.load(log_marginal_ptr + row, mask=row_ok, other=0.0).to(dtype)
    tl.store(out_ptr + row, reg * (log_marginal - lse), mask=row_ok)


def _power_of_two_at_most(value: int, high: int) -> int:
    return max(1, min(high, 1 << max(0, value - 1).bit_length()))


def softmin_update_triton(
    cost: torch.Tensor,
    other: torch.Tensor,
    log_marginal: torch.Tensor,
    reg: float,
    max_block_cols: int | None = None,
) -> torch.Tensor:
    """Launcher: tiles within :func:`block_size`'s budget, at most 512 columns wide on a GPU (or
    ``max_block_cols``, a power of two); ``cost`` is read through its strides (a transposed view
    costs nothing)."""
    rows, cols = cost.shape
    out = torch.empty(rows, dtype=other.dtype, device=other.device)
    if rows == 0:
        return out
    budget = max(block_size(), 2048)  # elements per tile: 4 x 512 on a GPU
    block_cols = _power_of_two_at_most(cols, max_block_cols or (budget if interpreting() else 512))
    block_rows = _power_of_two_at_most(rows, budget // block_cols)
    reg_tensor = torch.tensor([reg], dtype=other.dtype, device=other.device)
    grid = (-(-rows // block_rows),)
    _softmin_update_kernel[grid](
        cost,
        other.contiguous(),
        log_marginal.contiguous(),
        reg_tensor,
        out,
        rows,
        cols,
        cost.stride(0),
        cost.stride(1),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
    )
    return out


def _checked(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated inputs in the compute dtype (float64 if M is, else float32)."""
    if M.ndim != 2 or a.shape != (M.shape[0],) or b.shape != (M.shape[1],):
        raise ValueError(
            f"sinkhorn: marginals {list(a.shape)} and {list(b.shape)} do not fit the cost matrix {list(M.shape)}"
        )
    if not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"sinkhorn: reg must be positive and finite, got {reg}")
    dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    return (
        a.to(device=M.device, dtype=dtype),
        b.to(device=M.device, dtype=dtype),
        M if M.is_floating_point() else M.to(dtype),
    )


def _solve(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float, max_iter: int, tol: float, update: Update
) -> torch.Tensor:
    """POT's schedule (see the module docstring) around one implementation of the update."""
    a, b, M = _checked(a, b, M, reg)
    n, m = M.shape
    if n == 0 or m == 0:
        return torch.zeros((n, m), dtype=a.dtype, device=M.device)
    log_a, log_b = a.log(), b.log()
    f = torch.zeros(n, dtype=a.dtype, device=M.device)  # any start: the plans do not depend on it
    g = update(M.T, f, log_b, reg)
    converged = False
    for iteration in range(max_iter):
        f = update(M, g, log_a, reg)
        check, last = iteration % CHECK_EVERY == 0, iteration == max_iter - 1
        if check or not last:
            g_next = update(M.T, f, log_b, reg)  # also the next iteration's column update
            if check:
                # column sums of the current plan: b_j exp((g_j - g_next_j) / reg)
                violation = float(
                    torch.linalg.vector_norm(torch.where(b > 0, b * torch.expm1((g - g_next) / reg), 0.0))
                )
                if violation < tol:
                    converged = True
                    break
                if not math.isfinite(violation):
                    warnings.warn(
                        f"sinkhorn: non-finite potentials at iteration {iteration} "
                        "(are the costs finite and the marginals non-negative?)",
                        stacklevel=3,
                    )
                    break
            if not last:
                g = g_next
    if not converged and max_iter > 0:
        warnings.warn(
            f"sinkhorn did not converge in {max_iter} iterations "
            f"(marginal violation above {tol:g}); increase max_iter or reg",
            stacklevel=3,
        )
    plan = torch.sub(f[:, None], M)  # the only n×m result: (f_i - M_ij + g_j) / reg, exponentiated in place
    return plan.add_(g[None, :]).div_(reg).exp_()


def sinkhorn_reference(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-9
) -> torch.Tensor:
    """The plan, with whole-matrix log-sum-exp updates."""
    return _solve(a, b, M, reg, max_iter, tol, softmin_update_reference)


def sinkhorn_torch(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-9
) -> torch.Tensor:
    """The plan, with row-blocked log-sum-exp updates (one block-sized buffer)."""
    return _solve(a, b, M, reg, max_iter, tol, softmin_update_torch)


def sinkhorn_triton(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-9
) -> torch.Tensor:
    """The plan, with the log-sum-exp updates by the Triton kernel."""
    return _solve(a, b, M, reg, max_iter, tol, softmin_update_triton)


def sinkhorn(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-9
) -> torch.Tensor:
    """The entropic transport plan between marginals ``a`` and ``b`` for costs ``M``; dispatches on
    M's device (see :func:`workbench_kernels.implementation`)."""
    impl = implementation(M.device)
    solver = {"reference": sinkhorn_reference, "triton": sinkhorn_triton}.get(impl, sinkhorn_torch)
    return solver(a, b, M, reg, max_iter, tol)
