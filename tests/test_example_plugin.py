"""Acceptance test of the example plugin package (docs/examples/workbench-example-plugin): built and
installed with pip into a site folder, then used through the CLI in subprocesses whose PYTHONPATH
holds that folder, so its entry point is found exactly as a pip-installed distribution's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from workbench.registry import CORE_DISTRIBUTION, load_registry
from workbench.testing import read_model, tiny_family

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "workbench-example-plugin"
RECIPE = EXAMPLE / "recipes" / "trimmed_mean.yaml"
PACKAGE = "workbench-example-plugin"
#: What building a package may leave in its source tree (pip builds from a copy here instead).
BUILD_LEFTOVERS = ("build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "models", "out")


def _install(source: Path, site: Path) -> Path:
    """pip-install a copy of ``source`` into ``site`` (no network, no build isolation): building
    from a copy keeps build/ and *.egg-info out of the repository."""
    copy = site.parent / f"{site.name}-src"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(copy),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return copy


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORKBENCH_PLUGINS", "WORKBENCH_DISABLE_PLUGINS", "PYTHONPATH")
    }
    # a wide terminal so that table cells are not wrapped; no bytecode written into the example's tests/
    env.update(PYTHONPATH=str(site), COLUMNS="400", PYTHONDONTWRITEBYTECODE="1", **extra)
    # one intra-op thread: generating and merging these small tensors is several times faster than
    # with torch's thread pool on a small, shared machine (check_streaming_memory writes ~150 MB)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _workbench(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("workbench")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from workbench.cli.main import main; main()"]
    )
    return subprocess.run(command + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _listed_methods(stdout: str) -> dict[str, str]:
    """method -> package, from the table `workbench methods` prints."""
    rows = [line.split() for line in stdout.splitlines()]
    return {row[0]: row[1] for row in rows if len(row) >= 2 and row[0] != "method"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("example") / "site"
    _install(EXAMPLE, site)
    return site


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding models/base and models/ft1..ft3, as the example recipe expects."""
    root = tmp_path_factory.mktemp("example-run")
    tiny_family(root / "models", fine_tunes=3)
    return root


def test_git_sees_the_example_files_and_installing_leaves_no_build_output(site: Path) -> None:
    files = sorted(
        p.relative_to(REPO).as_posix()
        for p in EXAMPLE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    for needed in (
        "pyproject.toml",
        "README.md",
        ".gitignore",
        "src/workbench_example/__init__.py",
        "src/workbench_example/trimmed_mean.py",
        "recipes/trimmed_mean.yaml",
        "tests/test_trimmed_mean.py",
    ):
        assert (EXAMPLE / needed).relative_to(REPO).as_posix() in files, needed
    # installing (the fixture ran pip) built nothing inside the repository
    leftovers = [
        p for pattern in ("build", "dist", "*.egg-info", "src/*.egg-info") for p in EXAMPLE.glob(pattern)
    ]
    assert not leftovers, leftovers
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *files], cwd=REPO, capture_output=True, text=True
    )
    if ignored.returncode not in (0, 1):
        pytest.skip(f"git cannot tell: {ignored.stderr.strip()}")
    assert not ignored.stdout.strip(), f".gitignore would hide {ignored.stdout.split()}"


def test_workbench_methods_lists_the_installed_method_with_its_package(site: Path, tmp_path: Path) -> None:
    done = _workbench(["methods"], _env(site), tmp_path)
    assert done.returncode == 0, done.stderr
    assert _listed_methods(done.stdout).get("trimmed_mean") == PACKAGE, done.stdout
    assert PACKAGE not in done.stderr  # no warning about the plugin


def test_the_example_recipe_runs_and_gives_the_trimmed_mean(site: Path, workdir: Path) -> None:
    done = _workbench(["run", str(RECIPE), "--quiet", "--overwrite"], _env(site), workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    merged = read_model(workdir / "out" / "trimmed_mean")
    inputs = [read_model(workdir / "models" / f"ft{i}") for i in (1, 2, 3)]
    assert set(merged) == set(inputs[0])
    for name, got in merged.items():
        # trim 0.34 of 3 models drops floor(1.02) = 1 value at each end of every element: the middle one
        values = np.sort(np.stack([t[name].double().numpy() for t in inputs]), axis=0)
        expected = values[1:2].mean(axis=0)
        assert got.dtype == inputs[0][name].dtype
        assert np.array_equal(got.double().numpy(), expected), name


@pytest.mark.parametrize("blocked", [PACKAGE, "example"])
def test_a_disabled_example_plugin_is_not_loaded(
    site: Path, workdir: Path, tmp_path: Path, blocked: str
) -> None:
    env = _env(site, WORKBENCH_DISABLE_PLUGINS=blocked)
    listed = _workbench(["methods"], env, tmp_path)
    assert listed.returncode == 0, listed.stderr
    methods = _listed_methods(listed.stdout)
    assert "trimmed_mean" not in methods and "linear" in methods
    run = _workbench(["run", str(RECIPE), "--quiet", "--out", str(tmp_path / "out")], env, workdir)
    assert run.returncode != 0
    assert "unknown method 'trimmed_mean'" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def test_the_example_package_own_tests_pass(site: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE / "tests"), "-q", "-p", "no:cacheprovider"],
        env=_env(site),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_a_plugin_built_for_another_api_major_is_refused_and_builtins_keep_working(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("example-api3")
    site = root / "site"
    # the same package, declaring the next major plugin API
    staged = root / "staged"
    shutil.copytree(EXAMPLE, staged, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    init = staged / "src" / "workbench_example" / "__init__.py"
    source = init.read_text()
    assert 'WORKBENCH_API = "2.0"' in source
    init.write_text(source.replace('WORKBENCH_API = "2.0"', 'WORKBENCH_API = "3.0"'))
    _install(staged, site)

    builtins = sorted(
        name for name, entry in load_registry().methods.items() if entry.plugin.package == CORE_DISTRIBUTION
    )
    assert "linear" in builtins

    listed = _workbench(["methods"], _env(site), root)
    assert listed.returncode == 0, listed.stderr
    warnings = [line for line in listed.stderr.splitlines() if PACKAGE in line]
    assert len(warnings) == 1, listed.stderr
    assert "warning" in warnings[0] and "3.0" in warnings[0] and "2.0" in warnings[0], warnings[0]
    methods = _listed_methods(listed.stdout)
    assert "trimmed_mean" not in methods
    assert sorted(m for m, package in methods.items() if package == CORE_DISTRIBUTION) == builtins

    # every built-in method that runs on plain models (atlas and lora_experts need text data) merges
    # the tiny family in the same environment
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from workbench.registry import get_registry
        from workbench.testing import build_recipe, merge, tiny_family

        registry = get_registry()
        assert any("workbench-example-plugin" in p and "2.0" in p for p in registry.problems), registry.problems
        assert "trimmed_mean" not in registry.methods
        family = tiny_family(Path(sys.argv[1]), fine_tunes=2)
        special = {
            "passthrough": ({}, family.models[:1]),
            "slerp": ({"parameters": {"t": 0.5}}, None),
            "nearswap": ({"parameters": {"t": 0.001}}, family.models[:1]),
            "arcee_fusion": ({}, family.models[:1]),
        }
        ran = []
        for name in sys.argv[2:]:
            fragment, models = special.get(name, ({}, None))
            merged = merge(build_recipe(name, family, fragment, models=models, registry=registry), registry=registry)
            assert merged, name
            ran.append(name)
        print("ran", *ran)
        """
    )
    runnable = [m for m in builtins if m not in ("atlas", "lora_experts")]
    done = subprocess.run(
        [sys.executable, "-c", script, str(root / "family"), *runnable],
        env=_env(site),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["ran", *runnable]
