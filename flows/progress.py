"""Progress on stderr: a rich bar on a terminal, a line per 10 % otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress


class Progress:
    """Context manager with :meth:`advance`."""

    def __init__(self, label: str, *, total: float, unit: str, enabled: bool = True) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0.0
        console = Console(file=sys.stderr)
        self._live = enabled and console.is_terminal
        self._echo = enabled and not self._live
        self._bar: _RichProgress | None = None
        self._printed = 0
        self._start = time.monotonic()
        if self._live:
            self._bar = _RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            )

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def advance(self, amount: float) -> None:
        """Record ``amount`` more units done."""
        self.done += amount
        if self._bar is not None:
            self._bar.update(self._task, advance=amount)
        elif self._echo and self.total > 0:
            step = int(10 * self.done / self.total)
            if step > self._printed:
                self._printed = step
                elapsed = time.monotonic() - self._start
                sys.stderr.write(f"{self.label}: {self.done:.1f}/{self.total:.1f} {self.unit} "
                                 f"({10 * step}%, {elapsed:.0f} s)\n")
                sys.stderr.flush()

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
