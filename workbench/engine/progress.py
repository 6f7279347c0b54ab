"""Progress of a running merge: events for any listener, and a rich progress bar for terminals."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

ProgressKind = Literal["note", "start", "tensor", "finish"]


@dataclass(frozen=True)
class ProgressEvent:
    kind: ProgressKind
    done: int  # tensors finished
    total: int  # tensors in the merge
    bytes_read: int
    total_bytes: int
    tensor: str | None = None
    #: kind "note": what a long ``prepare`` is doing (e.g. a learning step and its loss).
    note: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]


class RichProgress:
    """A progress bar with tensors/s, GB/s and ETA on a terminal; silent in pipes and CI logs."""

    def __init__(self, enabled: bool | None = None, label: str = "merging") -> None:
        from rich.console import Console

        self.label = label  # what the work is called in front of the bar
        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._progress: Any = None
        self._task: Any = None
        self._start = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if event.kind == "note" and event.note:
            self.console.print(event.note, markup=False, highlight=False)
        elif event.kind == "start":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._start = time.perf_counter()
            self._progress = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tensors  {task.fields[rate]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._task = self._progress.add_task("merge", total=event.total, rate="")
            self._progress.start()
        elif event.kind == "tensor" and self._progress is not None:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            rate = f"{event.done / elapsed:.1f} tensors/s  {event.bytes_read / elapsed / 1e9:.2f} GB/s"
            self._progress.update(self._task, completed=event.done, rate=rate)
        elif event.kind == "finish" and self._progress is not None:
            self._progress.stop()
            self._progress = None
