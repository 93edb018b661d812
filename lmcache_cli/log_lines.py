"""The library's log records on the CLI's stderr, one masked ``warning:`` line each.

Without a handler Python prints WARNING and above bare (``logging.lastResort``), and
asyncio's "Task exception was never retrieved" (aiohttp and aiobotocore after a
connection reset, which the store already reported as a failed call) came out as
60 lines of traceback. ``LMCACHE_DEBUG=1`` adds tracebacks, asyncio's records and
lmcache's own debug lines (never other libraries' debug lines: botocore's print
request headers with credentials).

A store's warnings that it refused or could not be reached (a denied password, a
server down, its circuit open) are held until the command ends: a command that then
fails says so in its one ``error:`` line, and the warning before it only repeated
(or, worded by the library, seemed to contradict) that line. Held warnings about a
store the error line names are left out; every other one is printed before the
error line, or at the end of a command that succeeds. With ``LMCACHE_DEBUG`` nothing
is held.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from lmcache_cli.errors import debug_enabled, one_line
from lmcache_cli.output import mask_secrets

# The loggers of the stores themselves (tiers, remotes, their connectors and breakers).
_STORE_LOGGERS = "lmcache_core.storage_backend"
# A URL as the library prints a store (``redis://:***@host:6379/0``, ``s3://bucket/p``),
# ended by white space or by the ": " that follows it in ``"<store>: <what>"``.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*?(?=[:,;.)]?(?:\s|$))")


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


#: Seconds a store's warning is held at most: a command that fails fails within a few
#: (a refused connection at once, a timeout within ``remote_timeout``), and one that
#: goes on for minutes (``warm`` against a flapping remote) must still show why it stalls.
HOLD_S = 5.0


@dataclass(frozen=True)
class _Held:
    line: str  # the formatted ``warning:`` line
    message: str  # the record's message, masked, one line
    stores: frozenset[str]  # the store URLs it names
    cause: bool  # it says why a store failed (not a breaker's "answered again" line)
    at: float  # time.monotonic() when held


def is_store_failure(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a store's warning that it refused or was unreachable.

    Told from the record, not its words alone: a warning of a store logger that
    carries the ``OSError`` it reports (``StoreUnavailableError``, ``StoreDeniedError``
    and ``StoreFullError`` are ones), the circuit breaker's state changes, and the
    remote's once-a-minute "<what> refused:" line (which carries the text only).
    Not errors (a close that dropped writes), and not warnings about chunks (a
    corrupt one removed), which are news on a failing command too.
    """
    if record.levelno != logging.WARNING or not record.name.startswith(_STORE_LOGGERS):
        return False
    return _says_why(record) or record.name.endswith(".circuit")


def _says_why(record: logging.LogRecord) -> bool:
    """Whether ``record`` carries the reason a store failed (its ``OSError``, or a "refused:" text)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return any(isinstance(arg, OSError) for arg in args) or " refused: " in str(record.msg)


def _urls(text: str) -> frozenset[str]:
    return frozenset(_URL.findall(text))


class HoldingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records as they come, except the store failures it holds (see the module).

    Thread-safe: records come from the stores' I/O threads.
    """

    def __init__(self, stream: TextIO, debug: bool) -> None:
        super().__init__(stream)
        self.setFormatter(_OneLineFormatter(debug))
        self.holding = not debug
        self._held: list[_Held] = []
        self._held_lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if not (self.holding and is_store_failure(record)):
            super().emit(record)
            return
        try:
            line = self.format(record)
            message = one_line(mask_secrets(record.getMessage()))
        except Exception:
            self.handleError(record)
            return
        with self._held_lock:
            self._held.append(_Held(line, message, _urls(message), _says_why(record), time.monotonic()))
            if self._timer is None:
                self._start_timer_locked(HOLD_S)

    def _start_timer_locked(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._release_old)
        self._timer.daemon = True
        self._timer.start()

    def _release_old(self) -> None:
        """Write the lines held ``HOLD_S`` or longer (the timer's; see ``HOLD_S``)."""
        with self._held_lock:
            self._timer = None
            now = time.monotonic()
            old = [item for item in self._held if now - item.at >= HOLD_S]
            self._held = [item for item in self._held if now - item.at < HOLD_S]
            if self._held:
                self._start_timer_locked(max(0.05, HOLD_S - (now - self._held[0].at)))
        self._write(old)

    def _write(self, items: list[_Held]) -> None:
        if not items:
            return
        # The handler's own lock, so no line lands inside another record's; bounded, as
        # end_interrupted's timer thread comes here while the main thread may hold it.
        locked = self.lock is not None and self.lock.acquire(timeout=1.0)
        try:
            for item in items:
                self.stream.write(item.line + self.terminator)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone: nothing more can be said
        finally:
            if locked and self.lock is not None:
                self.lock.release()

    def release_held(self, reported: str | None, *, last: bool = False) -> None:
        """Write the held lines, leaving out those about a store ``reported`` names (the
        same URL exactly: ``s3://b/p`` is not ``s3://b/p2``). ``last``: hold nothing more."""
        with self._held_lock:
            held, self._held = self._held, []
            if last:
                self.holding = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        named = _urls(mask_secrets(reported)) if reported is not None else frozenset()
        self._write([item for item in held if not item.stores & named])

    def held_cause(self, about: str) -> str | None:
        """What the last held warning about a store ``about`` names says, without the store's name."""
        with self._held_lock:
            held = list(self._held)
        wanted = _urls(mask_secrets(about))
        for item in reversed(held):
            named = item.stores & wanted
            if named and item.cause:
                text = item.message
                for url in named:
                    text = text.replace(f"{url}: ", "")
                return re.sub(r"\s*\(such refusals are logged [^)]*\)", "", text).strip() or None
        return None


def _installed() -> HoldingHandler | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, HoldingHandler):
            return handler
    return None


def release_store_warnings(reported: str | None = None, *, last: bool = False) -> None:
    """Print the store warnings held so far before the command's next (or last) line.

    Args:
        reported: the error line about to be printed: held warnings about a store it
            names are dropped, it says so. None: print them all (the command succeeded).
        last: the command has ended: from now on (worker threads still running, the
            exit drain) warnings print as they come.
    """
    handler = _installed()
    if handler is not None:
        handler.release_held(reported, last=last)


def store_failure_cause(about: str) -> str | None:
    """Why a store that ``about`` names (its URL, or a text with it) refused or failed,
    from its latest held warning; None if none is held (no handler, debug on, or the
    store said nothing), for an error line that then says it instead."""
    handler = _installed()
    return None if handler is None else handler.held_cause(about)


def install_log_handler() -> None:
    """Send log records (warnings and up; lmcache's debug lines too with ``LMCACHE_DEBUG``)
    to stderr as one masked line each. Left alone where logging is configured already.
    Not thread-safe: call once, at start-up."""
    root = logging.getLogger()
    if root.handlers:
        return
    debug = debug_enabled()
    root.addHandler(HoldingHandler(sys.stderr, debug))
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
