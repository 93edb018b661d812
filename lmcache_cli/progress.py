"""Progress bars on stderr, only when a person is watching a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from lmcache_cli.output import Output


class Bar:
    """Counts chunks and bytes; draws nothing unless built with a rich Progress.

    A bar measured in bytes fills with ``nbytes``; one measured in chunks (``by_chunks``)
    fills with ``chunks`` and shows the bytes as a count beside it.
    """

    def __init__(self, progress: Any = None, task: Any = None, by_chunks: bool = False) -> None:
        self._progress = progress
        self._task = task
        self._by_chunks = by_chunks
        self.chunks = 0
        self.nbytes = 0

    def advance(self, chunks: int = 1, nbytes: int = 0) -> None:
        self.chunks += chunks
        self.nbytes += nbytes
        if self._progress is not None:
            from lmcache_cli.units import human_size

            self._progress.update(
                self._task, advance=chunks if self._by_chunks else nbytes, chunks=self.chunks,
                nbytes=human_size(self.nbytes),
            )  # fmt: skip


@contextmanager
def progress_bar(
    out: Output, description: str, total_bytes: int | None, total_chunks: int, *, by_chunks: bool = False,
    bytes_label: str = "", show_bytes: bool = True,
) -> Iterator[Bar]:
    """A bar showing how much is done (percent, chunks, bytes), rate and ETA; a silent
    counter off a terminal.

    Args:
        total_bytes: the bytes the work covers (None: unknown), for a bar in bytes.
        total_chunks: the chunks it covers (0: unknown).
        by_chunks: fill the bar by chunks done, not bytes: for work where a chunk can
            finish without moving its bytes (``warm`` skips what the destination has),
            which would leave a bar in bytes short of its end, or empty on a rerun.
        bytes_label: with ``by_chunks``, the word after the byte count ("copied").
        show_bytes: with ``by_chunks``, show the byte count (False: work that reads
            no payloads, like ``lookup``, would only ever show "0 B").
    """
    if not out.progress_enabled:
        yield Bar(by_chunks=by_chunks)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    of_chunks = "/{task.fields[total_chunks]}" if total_chunks else ""
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if by_chunks:
        label = f" {bytes_label}" if bytes_label else ""
        moved = ", {task.fields[nbytes]}" + label if show_bytes else ""
        columns.append(TextColumn("{task.fields[chunks]}" + of_chunks + " chunks" + moved))
    else:
        columns += [
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[chunks]}" + of_chunks + " chunks"),
            TransferSpeedColumn(),
        ]
    columns.append(TimeRemainingColumn())
    progress = Progress(*columns, console=Console(stderr=True), transient=True)
    total = (total_chunks or None) if by_chunks else total_bytes
    with progress:
        task = progress.add_task(
            description, total=total, chunks=0, total_chunks=total_chunks, nbytes="0 B"
        )
        yield Bar(progress, task, by_chunks)
