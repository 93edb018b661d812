"""A circuit breaker: stop calling a remote that keeps failing, probe it later.

States::

    closed --(failure_threshold consecutive failures)--> open
    open --(reset_timeout elapsed; one caller let through)--> half_open
    half_open --(probe succeeds)--> closed
    half_open --(probe fails, or no answer within reset_timeout)--> open

While open, ``allow()`` is False, so callers fail fast instead of each waiting
out a timeout against a dead server. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one remote and fails fast while it is down.

    Args:
        failure_threshold: consecutive failures that open the circuit (>= 1).
        reset_timeout: seconds the circuit stays open before one probe is let through.
        name: what the breaker guards, for log lines (no secrets).
        clock: a monotonic clock, replaceable in tests.

    Thread-safe.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        *,
        name: str = "remote",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if reset_timeout <= 0:
            raise ValueError(f"reset_timeout must be > 0 seconds, got {reset_timeout}")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started = 0.0
        self._last_failure = ""
        self.times_opened = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (an open circuit past its cooldown reads ``open``)."""
        with self._lock:
            return self._state

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._failures

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state only one probe at a time."""
        with self._lock:
            now = self._clock()
            if self._state == CLOSED:
                return True
            if self._state == OPEN:
                if now - self._opened_at < self.reset_timeout:
                    return False
                self._state = HALF_OPEN
                self._probe_started = now
                logger.info("%s: circuit half-open, probing", self.name)
                return True
            # half-open: a probe is out; let another through only if it never reported back
            if now - self._probe_started >= self.reset_timeout:
                self._probe_started = now
                return True
            return False

    def retry_after(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when closed)."""
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self.reset_timeout - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        with self._lock:
            if self._state != CLOSED:
                logger.warning("%s: remote answered again, circuit closed", self.name)
            self._state = CLOSED
            self._failures = 0

    def why_open(self) -> str:
        """``circuit open (retry in N s; last failure: ...)``: for errors of calls refused
        while open, so an operator sees the cause ("Connection refused"), not only the state."""
        retry = self.retry_after()
        with self._lock:
            last = self._last_failure
        return f"circuit open (retry in {retry:.1f}s" + (f"; last failure: {last})" if last else ")")

    def record_failure(self, cause: str = "") -> None:
        """Count a failure; ``cause``: what failed, in words safe to print (no secrets)."""
        with self._lock:
            if cause:
                self._last_failure = cause
            self._failures += 1
            if self._state == HALF_OPEN or (
                self._state == CLOSED and self._failures >= self.failure_threshold
            ):
                if self._state == CLOSED:
                    logger.warning(
                        "%s: %d consecutive failures, circuit open for %.1fs (calls fail fast)",
                        self.name,
                        self._failures,
                        self.reset_timeout,
                    )
                self._state = OPEN
                self._opened_at = self._clock()
                self.times_opened += 1
            elif self._state == OPEN:
                # A late failure of a call sent before the circuit opened: restart the cooldown.
                self._opened_at = self._clock()

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held at fork) and closed state."""
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Back to closed with no failures (e.g. after the remote was reconfigured)."""
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._last_failure = ""
