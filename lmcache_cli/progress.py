"""Progress bars on stderr, only when a person is watching a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from lmcache_cli.output import Output


class Bar:
    """Counts chunks and bytes; draws nothing unless built with a rich Progress."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress = progress
        self._task = task
        self.chunks = 0
        self.nbytes = 0

    def advance(self, chunks: int = 1, nbytes: int = 0) -> None:
        self.chunks += chunks
        self.nbytes += nbytes
        if self._progress is not None:
            self._progress.update(self._task, advance=nbytes, chunks=self.chunks)

    def update_total(self, total_bytes: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, total=total_bytes)


@contextmanager
def progress_bar(out: Output, description: str, total_bytes: int | None, total_chunks: int) -> Iterator[Bar]:
    """A bar showing bytes and chunks done, rate and ETA; a silent counter off a terminal."""
    if not out.progress_enabled:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[chunks]}/{task.fields[total_chunks]} chunks"),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total_bytes, chunks=0, total_chunks=total_chunks)
        yield Bar(progress, task)
