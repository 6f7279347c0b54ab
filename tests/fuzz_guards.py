"""Guards shared by the fuzz targets (tests/test_fuzz_*.py): a hang or a header-driven allocation
must fail the test, not stall or crash the suite.

- ``time_limit(seconds)``: raises ``Hang`` in the test when its body runs too long.
- ``run_capped(setup, body, headroom=...)``: runs Python code in a child process whose address space
  is capped just above what ``setup`` left it, after proving the cap really refuses a larger
  allocation; the caller checks the result.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager


class Hang(Exception):
    """The code under test ran past its time limit (an ordinary exception, so hypothesis shrinks it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``Hang`` inside the body once it has run ``seconds`` of wall time (main thread only;
    SIGALRM interrupts Python code, and the C code of json, yaml and mmap returns to it quickly)."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Runs in the child: cap the address space at its current size plus HEADROOM, then prove the cap
# bites (an allocation of twice the headroom must fail) before the body runs.
_CAP = """
import resource

def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()

_limit = _address_space() + HEADROOM
resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))
try:
    _probe = bytearray(2 * HEADROOM)
except MemoryError:
    pass
else:
    raise SystemExit("the address-space cap does not refuse an allocation of twice its headroom")
"""


def run_capped(
    setup: str, body: str, *, headroom: int = 64 * 2**20, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``setup`` (imports, files) then ``body`` in a fresh Python whose address space may grow by
    at most ``headroom`` bytes after ``setup``: an allocation sized by a lying header fails there
    with ``MemoryError`` instead of passing unnoticed. Linux only (/proc/self/statm)."""
    script = "\n".join(
        [textwrap.dedent(setup), _CAP.replace("HEADROOM", str(headroom)), textwrap.dedent(body)]
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=False
    )
