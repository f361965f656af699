"""A small progress bar on stderr (rich), off when asked or when stderr is not a terminal."""

from __future__ import annotations

import sys
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
    """Context manager with :meth:`advance`; prints a final line when stderr is no terminal."""

    def __init__(self, label: str, *, total: float, unit: str, enabled: bool = True) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0.0
        console = Console(file=sys.stderr)
        self._live = enabled and console.is_terminal
        self._echo = enabled and not self._live
        self._bar: _RichProgress | None = None
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

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self._echo:
            print(f"{self.label}: {self.done:.1f}/{self.total:.1f} {self.unit}", file=sys.stderr)
