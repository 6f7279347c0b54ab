"""Merge kernels: one module per op, each with a pure-torch reference, a torch path, a Triton
kernel, for the hot ops a CPU kernel compiled by Numba (:mod:`workbench_kernels.cpu`), and a
dispatcher.

The dispatcher of every op picks, for the device of its inputs: Triton on CUDA (when triton is
installed), the Numba kernel on CPU where the op has one worth Numba's set-up, the torch path
otherwise (other devices, other dtypes). ``WORKBENCH_KERNELS=reference|torch|numba|triton`` forces
one (tests and ``workbench bench --check`` compare them; an op without a Numba kernel runs its torch
path). Triton kernels run on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``),
which the test suite uses to exercise them. The interpreter reads that variable when a kernel is
defined, i.e. when this package is imported; triton itself is imported only where a kernel can run
(CUDA present, or the interpreter asked for), so a CPU-only merge never pays for it. Kernel modules
decorate their kernels with :func:`jit` and use :data:`tl`, both inert without triton.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

if __name__ == "kernels":
    # This folder is the package workbench_kernels. It is importable as ``kernels`` only where a
    # checkout's root is on sys.path (``python -m pytest``, Ray workers started in the checkout), and
    # that is the name of Hugging Face's ``kernels`` distribution, which transformers imports when it is
    # installed: hand the import over to that distribution, or fail as if no ``kernels`` existed.
    _checkout = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' ({os.path.dirname(os.path.abspath(__file__))} is the package "
            "workbench_kernels; import it by that name)",
            name="kernels",
        )
    _distribution = importlib.util.module_from_spec(_spec)
    # The import system returns what sys.modules holds once this file has run: the distribution.
    sys.modules["kernels"] = _distribution
    _spec.loader.exec_module(_distribution)

# After the hand-over, which must work where torch is not importable.
import torch  # noqa: E402

F = TypeVar("F", bound=Callable[..., Any])

IMPLEMENTATIONS = ("reference", "torch", "numba", "triton")


def selected_impl() -> str | None:
    """The implementation forced by ``WORKBENCH_KERNELS``, if any."""
    value = os.environ.get("WORKBENCH_KERNELS", "").strip().lower()
    if value and value not in IMPLEMENTATIONS:
        raise ValueError(f"WORKBENCH_KERNELS={value!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    return value or None


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under the Triton interpreter (kernels run on CPU tensors, slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _load_triton() -> Any:
    if not triton_installed() or not (interpreting() or torch.cuda.is_available()):
        return None
    import triton

    return triton


#: The triton module where kernels can run here, else None.
TRITON = _load_triton()
#: ``triton.language`` for kernel bodies (None without triton: kernels are then never launched).
tl: Any = TRITON.language if TRITON is not None else None


def jit(fn: F) -> F:
    """``triton.jit`` where triton can run; otherwise the plain function, which is never launched."""
    return TRITON.jit(fn) if TRITON is not None else fn


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of this device."""
    return TRITON is not None and (device.type == "cuda" or interpreting())


def implementation(device: torch.device, *, numba_on_cpu: bool = True) -> str:
    """The implementation an op uses for inputs on ``device``: forced, or the fastest available.

    An op whose Numba kernel is no faster than its torch path inside a merge passes
    ``numba_on_cpu=False``: the first Numba kernel of a process costs ~0.4 s of Numba's own set-up
    (its CPU target's registries) on the 2-core development machine, which such an op would add to
    every merge for nothing (``WORKBENCH_KERNELS=numba`` still selects its kernel)."""
    forced = selected_impl()
    if forced == "triton" and not triton_runs_on(device):
        why = (
            "triton is not installed"
            if not triton_installed()
            else (
                f"tensors are on {device.type}, not CUDA, and TRITON_INTERPRET=1 "
                "was not set when workbench_kernels was imported"
            )
        )
        raise ValueError(f"WORKBENCH_KERNELS=triton, but {why}")
    if forced:
        return forced
    if device.type == "cuda" and triton_runs_on(device):
        return "triton"
    return "numba" if device.type == "cpu" and numba_on_cpu else "torch"


def block_size() -> int:
    """Elements per Triton program: small on a GPU; large under the interpreter, which pays ~1 ms
    per program instance."""
    return 1 << 16 if interpreting() else 1024


#: The most inputs one Triton launch takes (pointer arguments are unrolled at compile time);
#: launchers fall back to the torch path beyond it.
MAX_TRITON_INPUTS = 8


def accumulator_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float32 for the half types, else the compute dtype itself.

    Summing in bf16 rounds at every step (8 bits of mantissa): a bf16 task arithmetic merge computed
    that way measured exact, once rounded, on 65% of elements, against ~100% when the same sum is
    accumulated in float32 and rounded once into the output. Inputs in a half type convert to
    float32 exactly, so this costs no accuracy and, on CPU, no speed."""
    return torch.float32 if compute_dtype in (torch.bfloat16, torch.float16) else compute_dtype
