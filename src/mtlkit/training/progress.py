"""Progress bars (rich) that cost nothing when disabled or when output is not a terminal."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, refresh_every: int = 25) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a rich progress bar when ``enabled``.

    The bar is redrawn every ``refresh_every`` advances, so a fast loop does not pay for drawing.
    """
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        pending = 0

        def advance(n: int = 1) -> None:
            nonlocal pending
            pending += n
            if pending >= refresh_every:
                progress.advance(task, pending)
                pending = 0

        yield advance
        progress.advance(task, pending)
