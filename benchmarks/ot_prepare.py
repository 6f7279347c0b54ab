"""Time of ``ot_fusion``'s prepare pass (the transport maps) against the hidden width.

Two independently generated one-layer Llama-shaped models per width (float32, vocabulary 1024,
intermediate 2.75 × hidden, head dim 64, 4 query heads per key/value head) are aligned with
weight-based costs; prepare computes one residual map (hidden × hidden), one head map and one MLP
map (intermediate × intermediate), so its time grows with the largest of these problems. Reported
per width and solver: seconds, and the solver each map used (EMD on square problems runs as an
assignment problem).

    python benchmarks/ot_prepare.py [--widths 256,512,1024,2048,4096] [--solvers emd,sinkhorn] [--limit 300]

A width whose previous one took longer than ``--limit`` seconds with a solver is skipped for that
solver (reported as such).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from workbench.architecture import layer_count
    from workbench.checkpoint.synthetic import LlamaShape, write_model
    from workbench.method import ParameterSet, PrepareContext
    from workbench.registry import get_registry
    from workbench_plugins.methods.ot_fusion.plugin import OTFusion

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="256,512,1024,2048,4096")
    parser.add_argument("--solvers", default="emd,sinkhorn")
    parser.add_argument(
        "--limit", type=float, default=300.0, help="skip larger widths for a solver once one took longer (s)"
    )
    args = parser.parse_args()
    registry = get_registry()
    slow: set[str] = set()
    print("| hidden | intermediate | solver | prepare s | solvers used |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="workbench-ot-bench-") as tmp:
        for width in (int(w) for w in args.widths.split(",")):
            heads = max(1, width // 64)
            shape = LlamaShape(width, int(2.75 * width) // 64 * 64, 1, heads, max(1, heads // 4), 1024)
            folders = [
                write_model(Path(tmp) / f"{width}-{seed}", shape, dtype="float32", seed=seed)
                for seed in (1, 2)
            ]
            readers = [registry.open_checkpoint(f) for f in folders]
            for solver in args.solvers.split(","):
                if solver in slow:
                    print(
                        f"| {width} | {shape.intermediate_size} | {solver} | "
                        f"skipped (the previous width took > {args.limit:.0f} s) | |",
                        flush=True,
                    )
                    continue
                names = readers[0].tensor_names()
                layers = layer_count(names, readers[0].config())
                ctx = PrepareContext(
                    models=readers,
                    base=None,
                    params=ParameterSet(OTFusion.Parameters, {"solver": solver}, layers),
                    model_params=[ParameterSet(OTFusion.ModelParameters, {}, layers) for _ in readers],
                    tensor_names=names,
                    device="cpu",
                    layer_count=layers,
                    registry=registry,
                )
                start = time.perf_counter()
                state = OTFusion().prepare(ctx)
                seconds = time.perf_counter() - start
                maps = state.maps[1]
                used = sorted(
                    {
                        maps.stream[0].solver,
                        *(t.solver for t in maps.heads.values()),
                        *(t.solver for t in maps.mlp.values()),
                    }
                )
                print(
                    f"| {width} | {shape.intermediate_size} | {solver} | {seconds:.2f} | {', '.join(used)} |",
                    flush=True,
                )
                del state, maps  # the next solver's run should not share memory with this one's maps
                if seconds > args.limit:
                    slow.add(solver)
            for reader in readers:
                reader.close()


if __name__ == "__main__":
    main()
