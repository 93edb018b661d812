"""A byte bound on the chunks queued for a tier's background writers.

Without one, ``put(blocking=False)`` in front of a medium slower than the puts (a
network disk, a remote) queued chunks until the process ran out of memory. A put
that finds the queue full waits for queued writes to finish: backpressure, not
loss, since a put is acknowledged only once queued. Writes that fail finish too
(a dead server, an open circuit), so a wait ends as the queue drains either way.

Not thread-safe on its own: every method runs under the owning backend's lock
(``*_locked``).

Interrupt-safe: a ``KeyboardInterrupt`` (or any exception a signal handler raises)
landing anywhere in a wait leaves the backend's lock held by the waiter again, as
the caller's ``with lock:`` expects. ``threading.Condition.wait`` does not promise
that with a plain lock: an interrupt landing in its Python-level ``_release_save``
or ``_acquire_restore`` left the lock released, and the caller's ``with`` then
released it a second time (``RuntimeError: release unlocked lock``, or, had another
thread taken it meanwhile, that thread's hold), so waits here use bare lock calls.
"""

from __future__ import annotations

import _thread
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
        self._lock = lock
        # One lock per waiting put, held until a finished write releases it (what
        # ``threading.Condition`` does, with nothing interruptible between releasing
        # the backend's lock and taking it back).
        self._waiters: list[Any] = []

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
            notified = self._wait_locked(left)
            if closed():
                raise RuntimeError("backend is closed")
            if not notified and (give_up is None or time.monotonic() < give_up):
                raise stalled(f"{self.queued} bytes of writes queued and none finished in {stall_s:g}s; not queued")
        return True

    def _wait_locked(self, timeout: float) -> bool:
        """Release the lock, wait up to ``timeout`` s for a wake-up, take the lock back.

        Whatever is raised (an interrupt included), the lock is held again on the way
        out: the release is inside the ``try`` whose ``finally`` takes it back, and
        both are bare C calls, so no interrupt can land between a release and its
        ``try`` or between the ``finally`` and the acquire.
        """
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        try:
            try:
                self._lock.release()
                return waiter.acquire(True, timeout)
            finally:
                self._lock.acquire()
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def _wake_locked(self) -> None:
        # A waiter is released only while still held: one woken but not yet gone from the
        # list is left alone (waiters are only ever released here, under the lock).
        for waiter in self._waiters:
            if waiter.locked():
                waiter.release()

    def add_locked(self, nbytes: int) -> None:
        self.queued += nbytes

    def done_locked(self, nbytes: int) -> None:
        """A queued write of ``nbytes`` finished (stored, failed or dropped as stale)."""
        self.queued -= nbytes
        self._wake_locked()

    def wake_all_locked(self) -> None:
        """Wake every waiting put (the backend is closing: they raise)."""
        self._wake_locked()


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


#: Seconds the exit drain may take in all before the process ends anyway. Each backend's
#: drain is bounded by its own terms (a remote's by its close timeout, about 71 s at the
#: defaults), but a store left broken (a lock an interrupted thread never let go) hung
#: the interpreter's exit for good.
EXIT_DRAIN_LIMIT_S = 120.0


def _drain_all() -> None:
    backends = list(_open_writers)
    if not backends:
        return
    done = threading.Event()

    def drain() -> None:
        for backend in backends:
            try:
                backend.close()
            except Exception:
                logger.exception("closing %s at exit failed", backend.describe())
        done.set()

    try:
        threading.Thread(target=drain, name="lmcache-exit-drain", daemon=True).start()
    except RuntimeError:  # no new threads this late (newer Pythons): drain here, unbounded
        drain()
        return
    if not done.wait(EXIT_DRAIN_LIMIT_S):
        logger.error("queued writes still not stored after %g s at exit: given up on them", EXIT_DRAIN_LIMIT_S)
