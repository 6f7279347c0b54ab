"""``workbench bench --ops``: each kernel against its torch reference, in one process (the Numba
kernels on CPU, the Triton kernels on CUDA).

Inputs: a base and three "fine-tunes" of 2**24 bf16 elements (the base plus small noise, so task
vectors tie in bf16 as real ones do). Reported per op and implementation: best time of the repeats
after one warm-up call (which pays any compilation), and the input throughput (bytes of all inputs
read over that time). On CUDA, the Triton kernels run and a device-to-device copy gives the card's
reachable bandwidth for comparison.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ELEMENTS = 1 << 24


def _ops(device: str) -> dict[str, tuple[Callable[[], Any], int]]:
    """op name -> (call, bytes of input it reads)."""
    import torch

    from workbench_kernels.finite import all_finite
    from workbench_kernels.slerp import slerp
    from workbench_kernels.sparsify import TaskVector
    from workbench_kernels.task_vector_merge import merge_task_vectors
    from workbench_kernels.threshold import topk_thresholds
    from workbench_kernels.weighted_sum import weighted_sum

    g = torch.Generator().manual_seed(0)
    base = torch.randn(ELEMENTS, generator=g).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(ELEMENTS, generator=g)).to(torch.bfloat16) for _ in range(3)]
    base, xs = base.to(device), [x.to(device) for x in xs]
    four = 4 * ELEMENTS * 2
    ties = [TaskVector(1.0, 0.5, "magnitude") for _ in xs]
    dare = [TaskVector(1.0, 0.5, "random", rescale="l1", seed=i) for i in range(3)]
    return {
        "weighted_sum (4 inputs)": (
            lambda: weighted_sum([base, *xs], [0.25] * 4, out_dtype=torch.bfloat16),
            four,
        ),
        "top-k thresholds (3 task vectors)": (lambda: topk_thresholds(xs, base, [ELEMENTS // 2] * 3), four),
        "ties (thresholds + fused merge)": (
            lambda: merge_task_vectors(
                base, xs, ties, consensus=True, normalize=True, scale=1.0, out_dtype=torch.bfloat16
            ),
            four,
        ),
        "dare_ties (l1 rescale + fused merge)": (
            lambda: merge_task_vectors(
                base, xs, dare, consensus=True, normalize=True, scale=1.0, out_dtype=torch.bfloat16
            ),
            four,
        ),
        "slerp (2 inputs)": (lambda: slerp(xs[0], xs[1], 0.3, out_dtype=torch.bfloat16), 2 * ELEMENTS * 2),
        "NaN/Inf check (1 input)": (lambda: all_finite(base), ELEMENTS * 2),
    }


def run_op_bench(device: str, repeat: int, json_out: Path | None, console: Any) -> list[dict[str, Any]]:
    import torch
    from rich.table import Table

    implementations = ["reference", "torch"] + (["triton"] if device.startswith("cuda") else ["numba"])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    results: list[dict[str, Any]] = []
    previous = os.environ.get("WORKBENCH_KERNELS")
    try:
        for name, (call, nbytes) in _ops(device).items():
            for impl in implementations:
                os.environ["WORKBENCH_KERNELS"] = impl
                call()  # warm-up: compilation, allocator
                sync()
                times = []
                for _ in range(max(1, repeat)):
                    start = time.perf_counter()
                    call()
                    sync()
                    times.append(time.perf_counter() - start)
                best = min(times)
                results.append(
                    {
                        "op": name,
                        "implementation": impl,
                        "best_s": round(best, 5),
                        "input_gb_per_s": round(nbytes / best / 1e9, 2),
                    }
                )
    finally:
        if previous is None:
            os.environ.pop("WORKBENCH_KERNELS", None)
        else:
            os.environ["WORKBENCH_KERNELS"] = previous
    if device.startswith("cuda"):
        x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        y.copy_(x)
        sync()
        start = time.perf_counter()
        y.copy_(x)
        sync()
        results.append(
            {
                "op": "device copy (read + write)",
                "implementation": "torch",
                "best_s": 0.0,
                "input_gb_per_s": round(2 * x.numel() / (time.perf_counter() - start) / 1e9, 1),
            }
        )

    table = Table("op", "implementation", "best s", "input GB/s", box=None, pad_edge=False)
    for r in results:
        table.add_row(r["op"], r["implementation"], f"{r['best_s']:.4f}", f"{r['input_gb_per_s']:.2f}")
    console.print(
        f"{ELEMENTS} bf16 elements per input, best of {max(1, repeat)} after a warm-up, device {device}"
    )
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")
    return results
