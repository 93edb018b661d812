"""The one place that writes: data to stdout, messages to stderr, in human, json or quiet mode.

Human tables are rich tables on a terminal and plain aligned columns otherwise
(pipes, files, CI logs), so scripts never see wrapped or truncated cells.
"""

from __future__ import annotations

import enum
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from lmcache_core.config import mask_secrets_in, mask_url

RICH_MAX_ROWS = 200


class OutputFormat(str, enum.Enum):
    """``--format`` values."""

    human = "human"
    json = "json"


@dataclass(frozen=True)
class Column:
    """A table column; ``right`` aligns numbers."""

    title: str
    right: bool = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Output:
    """Writes a command's results.

    Args:
        fmt: ``human`` or ``json``; json prints one JSON document on stdout.
        quiet: no messages or progress on stderr (data and errors still appear).
    """

    def __init__(self, fmt: OutputFormat = OutputFormat.human, quiet: bool = False) -> None:
        self.fmt = fmt
        self.quiet = quiet

    @property
    def json(self) -> bool:
        return self.fmt == OutputFormat.json

    @property
    def human(self) -> bool:
        return self.fmt == OutputFormat.human

    # sys.stdout/err are looked up at each call: CliRunner swaps them per invocation.
    @property
    def stdout(self) -> Any:
        return sys.stdout

    @property
    def stderr(self) -> Any:
        return sys.stderr

    @property
    def progress_enabled(self) -> bool:
        """Progress bars only for a person watching a terminal."""
        return not self.quiet and _isatty(sys.stderr)

    def data(self, payload: Any) -> None:
        """The json document (json mode only): standard JSON, so a non-finite number
        (the mean of huge float64 values overflows to inf) is ``null``, never the
        ``Infinity``/``NaN`` that Python's json writes and jq or JSON.parse reject."""
        if self.json:
            text = json.dumps(_finite(payload), indent=2, default=str, allow_nan=False)
            self.stdout.write(text + "\n")

    def line(self, text: str = "") -> None:
        """A line of human data on stdout."""
        self.stdout.write(text + "\n")

    def message(self, text: str) -> None:
        """A status line on stderr (hidden with --quiet), secrets masked."""
        if not self.quiet:
            self.stderr.write(mask_secrets(text) + "\n")
            self.stderr.flush()

    def warn(self, text: str) -> None:
        """One warning line on stderr (shown even with --quiet), secrets masked."""
        self.stderr.write(f"warning: {_one_line(mask_secrets(text))}\n")

    def error(self, text: str) -> None:
        """One error line on stderr, always shown, secrets masked; the store warnings
        held so far go first, less those about a store it names (see ``log_lines``)."""
        from lmcache_cli.log_lines import release_store_warnings  # it imports this module

        release_store_warnings(text)
        self.stderr.write(f"error: {_one_line(mask_secrets(text))}\n")
        self.stderr.flush()

    def table(self, columns: Sequence[Column], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
        """A human table on stdout.

        A rich table on a terminal when it fits the width and is short; plain
        aligned columns otherwise (pipes, CI logs, 10,000-row listings): never a
        folded key, and no per-row rendering cost.
        """
        cells = [["" if c is None else str(c) for c in row] for row in rows]
        widths = [len(c.title) for c in columns]
        for row in cells:
            for i, cell in enumerate(row):
                if len(cell) > widths[i]:
                    widths[i] = len(cell)
        if len(cells) <= RICH_MAX_ROWS and _isatty(self.stdout):
            from rich.console import Console

            console = Console(file=self.stdout)
            if sum(widths) + 2 * len(columns) + 2 <= console.width:
                self._rich_table(console, columns, cells, title)
                return
        if title:
            self.line(title)
        last = len(columns) - 1

        def fmt(values: Sequence[str]) -> str:
            parts = []
            for i, (col, v) in enumerate(zip(columns, values, strict=True)):
                if col.right:
                    parts.append(v.rjust(widths[i]))
                else:
                    parts.append(v if i == last else v.ljust(widths[i]))
            return "  ".join(parts).rstrip()

        out = [fmt([c.title for c in columns])]
        out.extend(fmt(row) for row in cells)
        self.stdout.write("\n".join(out) + "\n")

    @staticmethod
    def _rich_table(console: Any, columns: Sequence[Column], cells: list[list[str]], title: str | None) -> None:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        # Cells as Text, never markup: a key may hold "[" ("vllm@m[/x]@1@0@ab" raised
        # MarkupError; "[bold]x" printed as "x" in bold, a key that does not exist).
        table = Table(
            title=None if title is None else Text(title), box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False
        )
        for col in columns:
            table.add_column(Text(col.title), justify="right" if col.right else "left", no_wrap=True)
        for row in cells:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)

    def fields(self, pairs: Sequence[tuple[str, Any]], title: str | None = None) -> None:
        """``name: value`` lines, names aligned (for one object, like ``show``)."""
        if title:
            self.line(title)
        width = max((len(k) for k, _ in pairs), default=0)
        for k, v in pairs:
            self.line(f"  {k.ljust(width)}  {v}")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float in it (inside dicts, lists and tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def mask_secrets(text: str) -> str:
    """``text`` with the credentials of every URL in it masked, ``user:pw@host`` too.

    The core's ``mask_secrets_in``: one implementation, so the CLI masks what the
    library does (an S3 bucket quoted by botocore as ``AKIA:secret@bucket``, a query's
    ``secret=``, a URL given as a query value) and keeps the text around it.
    """
    return mask_secrets_in(text)


def _one_line(text: str) -> str:
    """``text`` with its line breaks (and the indentation after them) folded into spaces:
    an exception's multi-line text (botocore's) must not break the one ``error:`` line."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def safe_url(url: str) -> str:
    """``mask_url`` where there is something to mask (it rewrites ``cpu://`` as ``cpu:``)."""
    return mask_url(url) if ("@" in url or "?" in url) else url
