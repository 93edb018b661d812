"""The library's log records on the CLI's stderr, one masked ``warning:`` line each.

Without a handler Python prints WARNING and above bare (``logging.lastResort``), and
asyncio's "Task exception was never retrieved" (aiohttp and aiobotocore after a
connection reset, which the store already reported as a failed call) came out as
60 lines of traceback. ``LMCACHE_DEBUG=1`` adds tracebacks, asyncio's records and
lmcache's own debug lines (never other libraries' debug lines: botocore's print
request headers with credentials).
"""

from __future__ import annotations

import logging
import sys

from lmcache_cli.errors import debug_enabled, one_line
from lmcache_cli.output import mask_secrets


class _OneLineFormatter(logging.Formatter):
    """``<level>: <message>``, secrets masked; one line unless debugging."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if self.debug:
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
            return mask_secrets(text)
        return one_line(mask_secrets(text))


def install_log_handler() -> None:
    """Send log records (warnings and up; lmcache's debug lines too with ``LMCACHE_DEBUG``)
    to stderr as one masked line each. Left alone where logging is configured already.
    Not thread-safe: call once, at start-up."""
    root = logging.getLogger()
    if root.handlers:
        return
    debug = debug_enabled()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(debug))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    if debug:
        # Debug lines of ours only: botocore's print request headers (Authorization,
        # X-Amz-Security-Token), which no URL masking recognises.
        for name in ("lmcache_core", "lmcache_cli"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    else:
        # Errors of tasks an I/O client left behind after a failed call the store has
        # already counted and reported: noise here, not news.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
