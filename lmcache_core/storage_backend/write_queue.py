"""A byte bound on the chunks queued for a tier's background writers.

Without one, ``put(blocking=False)`` in front of a medium slower than the puts (a
network disk, a remote) queued chunks until the process ran out of memory. A put
that finds the queue full waits for queued writes to finish: backpressure, not
loss, since a put is acknowledged only once queued. Writes that fail finish too
(a dead server, an open circuit), so a wait ends as the queue drains either way.

Not thread-safe on its own: every method runs under the owning backend's lock,
which the condition shares (``*_locked``).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any, Callable, Protocol

logger = logging.getLogger(__name__)

#: Bytes of chunks a tier's background writers may have queued (``max_queued_bytes``).
MAX_QUEUED_BYTES = 1 << 30


class QueuedBytes:
    """Bytes queued for the writers, bounded by ``max_bytes`` (one chunk always fits).

    Args:
        lock: the owning backend's lock (the condition's).
        max_bytes: the bound.
    """

    def __init__(self, lock: threading.Lock, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_queued_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.queued = 0
        self._room = threading.Condition(lock)

    def full_locked(self, nbytes: int) -> bool:
        """Whether a put of ``nbytes`` would have to wait now."""
        return bool(self.queued) and self.queued + nbytes > self.max_bytes

    def wait_for_room_locked(
        self,
        nbytes: int,
        *,
        stall_s: float,
        closed: Callable[[], bool],
        stalled: Callable[[str], Exception],
        stats: Any,
        timeout: float | None = None,
    ) -> bool:
        """Under the lock: wait until ``nbytes`` more fit; True once they do.

        Args:
            stall_s: give up (raise ``stalled(why)``) when no queued write finished for this long.
            closed: whether the backend was closed (checked after each wake: RuntimeError).
            stalled: the backend's error for a stalled queue, given the reason.
            stats: the backend's counters (``put_backpressure_waits``: puts that waited).
            timeout: wait at most this long in all (0: not at all), then return False.

        Raises:
            RuntimeError: the backend was closed while waiting.
        """
        if not self.full_locked(nbytes):
            return True
        if timeout == 0:
            return False
        stats.incr("put_backpressure_waits")
        give_up = None if timeout is None else time.monotonic() + timeout
        while self.full_locked(nbytes):
            left = stall_s if give_up is None else min(stall_s, give_up - time.monotonic())
            if left <= 0:
                return False
            notified = self._room.wait(timeout=left)
            if closed():
                raise RuntimeError("backend is closed")
            if not notified and (give_up is None or time.monotonic() < give_up):
                raise stalled(f"{self.queued} bytes of writes queued and none finished in {stall_s:g}s; not queued")
        return True

    def add_locked(self, nbytes: int) -> None:
        self.queued += nbytes

    def done_locked(self, nbytes: int) -> None:
        """A queued write of ``nbytes`` finished (stored, failed or dropped as stale)."""
        self.queued -= nbytes
        self._room.notify_all()

    def wake_all_locked(self) -> None:
        """Wake every waiting put (the backend is closing: they raise)."""
        self._room.notify_all()


class _Drainable(Protocol):
    def close(self) -> None: ...

    def describe(self) -> str: ...


# Backends whose queued writes are stored at interpreter exit, as a thread pool's
# tasks are: their writers are daemon threads (a hung write must never hang exit),
# so without this a script that ends without close() lost writes it was told were
# queued (a remote lost 10 to 26 of 40 queued 4 MiB puts).
_open_writers: weakref.WeakSet[Any] = weakref.WeakSet()


def drain_at_exit(backend: _Drainable) -> None:
    """Have ``backend.close()`` (which drains its queued writes) run at interpreter exit.

    Thread-safe. Re-registers the exit hook, so it runs before the exit hooks of
    anything opened earlier: a connector's client (s3fs closes its session from
    ``weakref.finalize``'s exit hook) is still usable while the writes drain.
    """
    _open_writers.add(backend)
    atexit.unregister(_drain_all)
    atexit.register(_drain_all)


def forget_at_exit(backend: _Drainable) -> None:
    """``backend`` was closed: nothing of it left to drain. Thread-safe."""
    _open_writers.discard(backend)


def _drain_all() -> None:
    for backend in list(_open_writers):
        try:
            backend.close()
        except Exception:
            logger.exception("closing %s at exit failed", backend.describe())
