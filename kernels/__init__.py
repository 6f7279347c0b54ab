"""Merge kernels: one module per op, each with a pure-torch reference, a fast path and a dispatcher.

``WORKBENCH_KERNELS=reference|torch`` forces an implementation (tests compare them); the default
picks the fast path for the tensor's device.
"""

from __future__ import annotations

import os

IMPLEMENTATIONS = ("reference", "torch")


def selected_impl() -> str | None:
    """The implementation forced by ``WORKBENCH_KERNELS``, if any."""
    value = os.environ.get("WORKBENCH_KERNELS", "").strip().lower()
    if value and value not in IMPLEMENTATIONS:
        raise ValueError(f"WORKBENCH_KERNELS={value!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    return value or None
