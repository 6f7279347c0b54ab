"""The checkout's ``kernels/`` folder is the package ``workbench_kernels``, but where the checkout's root
is on sys.path (``python -m pytest``, Ray workers) it is also importable as ``kernels``: the name of
Hugging Face's distribution, which transformers imports when it is installed. A bare ``import kernels``
must reach that distribution (or fail as if none were installed), never this folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_a_bare_import_reaches_the_installed_distribution(tmp_path: Path) -> None:
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'the distribution'\n")
    done = _run(
        f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        import kernels
        from kernels import CUDAProperties
        import workbench_kernels
        print(CUDAProperties, kernels.__file__, workbench_kernels.__file__, sep="|")
        """
    )
    assert done.returncode == 0, done.stderr
    marker, bare, ours = done.stdout.strip().split("|")
    assert marker == "the distribution"
    assert Path(bare) == tmp_path / "kernels" / "__init__.py"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"


def test_without_a_distribution_a_bare_import_fails_by_name() -> None:
    done = _run(
        f"""
        import sys
        sys.path[:] = [{str(ROOT)!r}] + [p for p in sys.path if "site-packages" not in p]
        try:
            import kernels
        except ModuleNotFoundError as exc:
            print(exc.name, exc, sep="|")
        """
    )
    assert done.returncode == 0, done.stderr
    name, message = done.stdout.strip().split("|", 1)
    assert name == "kernels"
    assert "workbench_kernels" in message
