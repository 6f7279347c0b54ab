"""Test plugins as installed distributions: a ``*.dist-info`` folder with one ``workbench.plugins``
entry point, plus the plugin's module, in a site folder. Put the folder on ``sys.path`` (this
process) or ``PYTHONPATH`` (subprocesses, Ray workers) and the registry finds the plugin exactly as
it finds a pip-installed one."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def install_plugin(
    site: Path, package: str, entry_point: str, module: str, source: str, version: str = "0.1"
) -> None:
    """Write distribution ``package`` whose entry point ``entry_point`` is ``module`` (``source``)."""
    dist_info = site / f"{package.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[workbench.plugins]\n{entry_point} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


def tiny_ta_recipe(family: dict[str, Path], path: Path) -> Path:
    """Task arithmetic of the tiny family's two fine-tunes at λ 0.5 (the sweeps vary λ)."""
    path.write_text(
        f"method: task_arithmetic\nbase: '{family['base']}'\nmodels: ['{family['ft1']}', '{family['ft2']}']\n"
        "parameters: {lambda: 0.5}\n"
    )
    return path


@contextmanager
def local_ray(site: Path) -> Iterator[list[int]]:
    """A local Ray instance (2 CPUs, no dashboard, no auth) whose workers import from ``site``;
    yields the pids of its processes and shuts it down afterwards."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(site), *sys.path])}},
        )
        node = ray._private.worker._global_node
        try:
            yield [p.process.pid for procs in node.all_processes.values() for p in procs]
        finally:
            ray.shutdown()
