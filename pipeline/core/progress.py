"""Rich progress bars that stay quiet when nobody is watching (no TTY, CI, DVC logs, DDP rank > 0)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def progress_enabled() -> bool:
    return sys.stderr.isatty() and is_rank_zero() and not os.environ.get("VMR_NO_PROGRESS")


def make_progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress_enabled(),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar when on a terminal; a plain iteration otherwise."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def log(message: str) -> None:
    """One line to stderr from rank 0 only (stage logs go to DVC's output)."""
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)
