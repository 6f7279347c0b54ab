"""The command's quick exit (``workbench.__main__``): it skips the interpreter's teardown but must
end a process as ``sys.exit`` would: the same status, every line printed, other threads finished,
``atexit`` handlers run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("code", "status", "stderr"),
    [("None", 0, ""), ("0", 0, ""), ("3", 3, ""), ("'bad things'", 1, "bad things\n")],
)
def test_exit_now_ends_with_the_status_sys_exit_would(code: str, status: int, stderr: str) -> None:
    done = _python(f"from workbench.__main__ import exit_now\nexit_now({code})")
    assert (done.returncode, done.stderr) == (status, stderr)


def test_exit_now_flushes_output_runs_atexit_and_waits_for_threads(tmp_path: Path) -> None:
    code = (
        "import atexit, sys, threading, time\n"
        "from pathlib import Path\n"
        "from workbench.__main__ import exit_now\n"
        "folder = Path(sys.argv[1])\n"
        "def late():\n"
        "    time.sleep(0.5)\n"
        "    (folder / 'thread').write_text('done')\n"
        "threading.Thread(target=late).start()\n"
        "atexit.register(lambda: (folder / 'atexit').write_text('ran'))\n"
        "sys.stdout.write('x' * 100000)  # held in the stream's buffer: no newline, no flush\n"
        "exit_now(0)\n"
    )
    done = _python(code, str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "x" * 100000
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_the_command_keeps_its_statuses_and_messages(tmp_path: Path) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "workbench", "methods"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0 and "task_arithmetic" in listing.stdout and listing.stdout.endswith("\n")
    missing = subprocess.run(
        [sys.executable, "-m", "workbench", "validate", str(tmp_path / "nope.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "nope.yaml does not exist" in missing.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "workbench", "no-such-command"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert usage.returncode == 2 and "No such command" in usage.stderr


def test_the_installed_script_uses_the_quick_exit() -> None:
    script = Path(sys.executable).with_name("workbench")
    if not script.exists():
        pytest.skip("no workbench script beside this interpreter")
    assert "from workbench.__main__ import run" in script.read_text()
