"""Peak memory of every built-in method under workbench.testing's streaming check, as a table.

    python benchmarks/method_memory.py

Uses the recipe fragments that tests/test_method_properties.py declares per method; results are in
docs/performance.md ("Memory of every built-in method under the streaming check").
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("TRITON_INTERPRET", "1")  # as the test suite runs without a GPU

from test_method_properties import PROPERTIES, _fragment, _inputs  # noqa: E402

from workbench.testing import (  # noqa: E402
    DEEP,
    Family,
    PropertyViolation,
    check_streaming_memory,
    read_model,
    tiny_family,
)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="method-memory-"))
    tiny = _inputs(tiny_family(root / "tiny"), root / "tiny")
    deep = _inputs(tiny_family(root / "deep", fine_tunes=2, shape=DEEP), root / "deep")
    mb = 2**20
    print("| method | inputs MB | peak above start MB | allowance MB | declared by memory_needed MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, props in sorted(PROPERTIES.items()):
        family = Family(deep.family.base, tuple(deep.models(props)))
        warm_up = Family(tiny.family.base, tuple(tiny.models(props)))
        holds = 0  # what the method keeps by its definition, as tests/test_method_properties.py declares it
        if props.holds is not None:
            shapes = [
                (n, tuple(x.shape)) for n, x in read_model(family.base).items() if x.is_floating_point()
            ]
            holds = props.holds(sum(math.prod(s) for _, s in shapes), shapes, len(family.models))
        try:
            report = check_streaming_memory(
                name,
                root / f"out-{name}",
                _fragment(name, props, tiny.text),
                family=family,
                warm_up=warm_up,
                holds=holds,
            )
        except PropertyViolation as exc:  # reported as measured, not hidden: the table goes on
            print(f"| {name} | over its allowance: {exc} | | | |", flush=True)
            continue
        print(
            f"| {name} | {report.inputs / mb:.0f} | {report.peak_extra / mb:.1f} "
            f"| {report.allowance / mb:.0f} | {report.declared / mb:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
