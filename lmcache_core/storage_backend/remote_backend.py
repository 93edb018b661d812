"""The remote tier: a connector (fsspec object store, Redis) plus the chunk format.

``LMCRemoteBackend`` adds to a connector, once for every transport: the chunk
format (checksummed safetensors; corrupt or foreign objects are misses), a hard
timeout on every remote call, retries with capped exponential backoff for
reads and whole-chunk writes (all idempotent), a circuit breaker, a worker for
non-blocking puts, and a cached set of known keys. ``LMCPipelinedRemoteBackend``
also fetches a batch concurrently and decodes each part as it arrives, in
LMCache's two stages: fetch threads (``network_worker``) feed decode threads
(``deserialize_worker``).

How a dead remote looks to the caller: ``get``/``contains`` are misses (counted
in ``stats``), a blocking ``put`` raises ``StoreUnavailableError``, a
non-blocking one is logged and counted; nothing waits longer than the timeout,
and the backend recovers by itself when the remote answers again.
"""

from __future__ import annotations

import _thread
import builtins
import functools
import itertools
import logging
import math
import os
import queue
import random
import threading
import time
import weakref
import zlib
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar

import torch

from lmcache_core import chunk_format
from lmcache_core.chunk_format import ChunkHeader
from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata, mask_secrets_in, mask_url
from lmcache_core.errors import (
    CorruptChunkError,
    LMCacheError,
    StoreFullError,
    StoreUnavailableError,
    WriteAbandonedError,
)
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.abstract_backend import (
    ChunkInfo,
    LMCBackendInterface,
    check_chunk,
    check_key,
)
from lmcache_core.storage_backend.circuit import OPEN, CircuitBreaker
from lmcache_core.storage_backend.connector.base import RemoteConnector
from lmcache_core.storage_backend.devices import caller_stream, for_library_threads
from lmcache_core.storage_backend.mem_pool import BufferPool, read_pool_bytes
from lmcache_core.storage_backend.write_queue import (
    MAX_QUEUED_BYTES,
    QueuedBytes,
    drain_at_exit,
    forget_at_exit,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that prove the remote answered: it is up, so they never open the circuit.
_ANSWERS: tuple[type[BaseException], ...] = (StoreFullError, PermissionError)
# Headers are ~300 bytes: one ranged read of this much nearly always holds one.
HEADER_PROBE_BYTES = 4096
# Most bytes of values in one fetch group of a pipelined batch, once a read has shown
# the value size (unless the connector sizes groups itself). A batch may take many
# timeouts in all, but each group must arrive within one: 48 x 4 MiB from moto on
# loopback in four even groups of 12 took 0.26-0.5 s a group (the groups share the
# link and end together, so a group took as long as the whole batch); in groups of
# 4 (16 MiB) 0.05-0.13 s a group, and the batch the same 0.25-0.3 s.
FETCH_GROUP_BYTES = 16 * 1024 * 1024


class RemoteBackendEndSignal:
    """Queued to stop a put worker after everything queued before it is written."""


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for remote reads and whole-chunk writes.

    Both are idempotent: a write replaces the whole object (or publishes it whole),
    so sending it again after a failure whose reply was lost stores the same
    chunk. S3 asks clients to retry its 500 and 503 replies; deletes are not
    retried (one that landed would then report the key absent).

    Attempt ``n`` (0-based) that fails waits ``min(max_delay, base_delay *
    multiplier**n)``, times ``1 ± jitter``, before the next one. All attempts
    of one call share that call's timeout: a retry is made only while there is
    time left for a try as slow as the one that failed.

    Attributes:
        attempts: tries per call, >= 1 (1 means no retry).
        base_delay: seconds after the first failure.
        max_delay: cap on any one wait.
        multiplier: growth factor per attempt.
        jitter: random fraction added or removed, so clients do not retry in step.
    """

    attempts: int = 3
    base_delay: float = 0.05
    max_delay: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("retry delays must be >= 0, multiplier >= 1, 0 <= jitter < 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based)."""
        base = min(self.max_delay, self.base_delay * self.multiplier**attempt)
        return base * (1 + random.uniform(-self.jitter, self.jitter))


class _QueuedPastDeadlineError(TimeoutError):
    """A call dropped unrun: every I/O thread was busy until its deadline."""


class _Strikes:
    """The one strike against the circuit a remote call that ran out of time earns.

    The caller's wait ends at the deadline and strikes; the try still running on the
    I/O thread fails a little later (the client's own timeout) and would strike
    again: each timed-out call counted twice, so the circuit opened after half its
    ``failure_threshold`` of calls. Whichever comes first takes it. Thread-safe
    (``next`` on a count is atomic).

    Args:
        waiting: whether the caller still waits for the call (default: its deadline
            has not passed).
    """

    __slots__ = ("_taken", "_waiting")

    def __init__(self, waiting: Callable[[], bool] | None = None) -> None:
        self._taken = itertools.count()
        self._waiting = waiting

    def gave_up(self, deadline: float) -> bool:
        """Whether the caller's wait is over (it struck, or will, for the call)."""
        return not self._waiting() if self._waiting is not None else time.monotonic() >= deadline

    def first(self) -> bool:
        return next(self._taken) == 0


class _Signal:
    """Set once (by a worker thread); waited on with bare lock calls. Thread-safe.

    ``threading.Event`` waits through a ``Condition``: a KeyboardInterrupt landing in
    its Python ``__enter__`` or ``wait`` left the condition's lock held (the thread
    calling ``set()`` then hung for good) or released twice (a ``RuntimeError``
    replaced the interrupt). Here each waiter waits on a lock of its own, which
    ``set`` releases: an interrupted wait leaves nothing behind but that lock.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[Any] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Wake every waiter. Call once."""
        self._set = True  # first: a waiter registering from now on sees it and never blocks
        for waiter in self._waiters:  # each released here only, once
            waiter.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it was set within ``timeout`` seconds (None: no limit)."""
        if self._set:
            return True
        waiter = _thread.allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        if self._set:  # set() ran before the append: it may not have seen this waiter
            return True
        return waiter.acquire(True, -1 if timeout is None else max(0.0, min(timeout, threading.TIMEOUT_MAX)))


class _CallFuture(Generic[T]):
    """A remote call's future, with the call's ``_Strikes``: what ``_DaemonPool`` runs it
    into and the caller waits on (``_await``).

    Not ``concurrent.futures.Future``: its waits go through a ``Condition``, and a
    KeyboardInterrupt in the caller's ``result()`` left that condition's lock held
    (the I/O thread finishing the call then hung in ``set_result`` for good, one
    thread of the pool lost per interrupt) or released it twice (a ``RuntimeError``
    replaced the interrupt, and the backend read it as an outage: a miss). Here the
    worker's steps are single C-level operations and the wait a bare lock's.
    """

    __slots__ = ("strikes", "_claim", "_outcome", "_done")

    def __init__(self, strikes: _Strikes) -> None:
        self.strikes = strikes
        # The first next() decides: the worker starting it, or the caller cancelling it.
        self._claim = itertools.count()
        self._outcome: tuple[bool, Any] | None = None  # (ok, result or exception)
        self._done = _Signal()

    def set_running_or_notify_cancel(self) -> bool:
        return next(self._claim) == 0

    def cancel(self) -> bool:
        """Keep the call from starting; False if it started already."""
        if next(self._claim) != 0:
            return False
        self._finish(False, CancelledError())
        return True

    def _finish(self, ok: bool, value: Any) -> None:
        self._outcome = (ok, value)  # one store: a waiter sees all of it or none
        self._done.set()

    def set_result(self, result: T) -> None:
        self._finish(True, result)

    def set_exception(self, exc: BaseException) -> None:
        self._finish(False, exc)

    def done(self) -> bool:
        return self._outcome is not None

    def exception(self) -> BaseException | None:
        outcome = self._outcome
        return None if outcome is None or outcome[0] else outcome[1]

    def result(self, timeout: float | None = None) -> T:
        """The call's result, or its exception raised; ``FutureTimeout`` if not done in time."""
        if not self._done.wait(timeout):
            raise FutureTimeout()
        outcome = self._outcome
        assert outcome is not None
        if outcome[0]:
            return outcome[1]  # type: ignore[no-any-return]
        raise outcome[1]


class _DaemonPool:
    """A fixed set of daemon threads running submitted callables into Futures.

    ``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter
    exit, so one call hung on a dead server would keep the process from exiting;
    these threads are daemons, and a task that starts after its deadline is
    dropped instead of run. Thread-safe.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._shut = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self,
        fn: Callable[..., T],
        *args: Any,
        deadline: float | None = None,
        future: Future[T] | _CallFuture[T] | None = None,
    ) -> Future[T] | _CallFuture[T]:
        """Run ``fn(*args)`` on a pool thread (into ``future``, or a new one). After
        ``shutdown`` the future fails at once: no thread is left to run it, and its
        caller would wait out its whole deadline for nothing."""
        if future is None:
            future = Future()
        if self._shut:
            future.set_exception(RuntimeError("the backend is closed"))
            return future
        self._queue.put((future, fn, args, deadline))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run_one(*item)
            # Drop the task before waiting for the next: a thread idling with its last
            # result alive would keep that chunk's buffer busy (and out of the pool).
            del item

    @staticmethod
    def _run_one(
        future: Future[Any] | _CallFuture[Any], fn: Callable[..., Any], args: tuple[Any, ...], deadline: float | None) -> None:
        if not future.set_running_or_notify_cancel():
            return
        if deadline is not None and time.monotonic() >= deadline:
            future.set_exception(_QueuedPastDeadlineError("deadline passed while queued"))
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the waiting caller
            future.set_exception(exc)
        else:
            future.set_result(result)

    def shutdown(self) -> None:
        """Stop the threads once idle; never waits (a hung thread is a daemon)."""
        self._shut = True
        for _ in self._threads:
            self._queue.put(None)


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` or what caused it is a timeout (builtin, or a client's own ``TimeoutError``)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or type(seen).__name__ == "TimeoutError":
            return True
        seen = seen.__cause__
    return False


#: ``bytes`` values at least this long are copied into a warm pooled buffer to decode.
_POOLED_COPY_MIN_BYTES = 256 * 1024

#: Keys a backend remembers as stored, so ``contains`` answers them without a round
#: trip: the most recently seen ones (an unbounded set grew by every key a serving
#: process ever put or listed, ~200 bytes each).
KNOWN_KEYS_MAX = 1 << 18
#: A refusal (access denied, store full) is logged as a warning at most this often per
#: kind; the rest at debug. Gets that are refused are misses, never raised: with expired
#: credentials a serving process showed nothing but its ``unavailable`` counts.
REFUSAL_WARN_EVERY_S = 60.0


_Fields = tuple[str, str, int, int, str]


class _KnownKeys:
    """The most recently seen ``max_keys`` keys (insertion order; a re-add moves a key
    last). Not thread-safe (the backend's lock guards it).

    Kept by ``key.as_tuple()``, hashed and compared in C: a key's own ``__hash__``
    and ``__eq__`` are Python code, and a KeyboardInterrupt landing between a re-add's
    removal and its insertion dropped the key (for ``_stale``: a mark lost, and an
    older chunk served). With tuples each change is a run of bytecodes with no call
    in it, where no interrupt lands.
    """

    __slots__ = ("_keys", "_max")

    def __init__(self, max_keys: int) -> None:
        self._keys: dict[_Fields, None] = {}
        self._max = max_keys

    def __contains__(self, key: object) -> bool:
        return isinstance(key, CacheEngineKey) and key.as_tuple() in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: CacheEngineKey) -> None:
        fields = key.as_tuple()
        keys = self._keys
        if fields in keys:
            del keys[fields]
        keys[fields] = None
        if len(keys) > self._max:
            del keys[next(iter(keys))]

    def update(self, keys: Iterable[CacheEngineKey]) -> None:
        for key in keys:
            self.add(key)

    def discard(self, key: CacheEngineKey) -> None:
        fields = key.as_tuple()
        keys = self._keys
        if fields in keys:
            del keys[fields]

    def replace(self, keys: Iterable[CacheEngineKey]) -> None:
        fresh = _KnownKeys(self._max)
        fresh.update(keys)
        self._keys = fresh._keys  # one store: an interrupt leaves the old set or the new one


class LMCRemoteBackend(LMCBackendInterface):
    """KV chunks in a remote store named by ``config.remote_url``.

    Args:
        config: ``remote_url`` picks the connector (``s3://``, ``redis://``, ...);
            ``remote_timeout`` bounds every remote call.
        metadata: engine metadata (unused by the remote tier; kept for LMCache's signature).
        dst_device: where ``get`` puts tensors.
        connector: a ready connector instead of one built from the URL (tests).
        retry: backoff for reads and whole-chunk writes (``RetryPolicy``).
        breaker: circuit breaker; default opens after 5 consecutive failures for 5 s.
        put_workers: background writer threads for ``blocking=False`` puts.
        list_timeout: seconds a ``list()`` may take (default 10 x ``remote_timeout``).
        close_timeout: how long ``close()`` keeps draining queued writes while none
            of them is stored (default: enough for the breaker to open and the rest
            to fail fast). A remote that keeps storing them is drained in full.
        max_queued_bytes: bytes of chunks ``put(blocking=False)`` may have queued;
            beyond it a put waits for queued writes to finish (default 1 GiB).
        **connector_options: passed to the connector (e.g. S3 ``endpoint_url``).

    The tensor ``get`` returns on CPU aliases the fetched buffer where the
    connector hands over writable memory (Redis and S3 values of 256 KiB or more);
    ``bytes`` are copied (into a warm pooled buffer when large).
    ``contains`` answers from the most recent keys this process has seen stored
    (``KNOWN_KEYS_MAX``), asking the remote for others; a ``get`` miss removes the key.

    Thread-safe. Fork-safe: a child process reopens the connector and starts its
    own workers (writes queued in the parent stay the parent's).
    """

    def __init__(
        self,
        config: LMCacheEngineConfig,
        metadata: LMCacheEngineMetadata | None = None,
        dst_device: str = "cuda",
        *,
        connector: RemoteConnector | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        put_workers: int = 2,
        list_timeout: float | None = None,
        close_timeout: float | None = None,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        **connector_options: Any,
    ) -> None:
        super().__init__(dst_device)
        if not config.remote_url and connector is None:
            raise ValueError("remote_url: not set; a remote backend needs e.g. s3://bucket/prefix or redis://host")
        if put_workers < 1:
            raise ValueError(f"put_workers must be >= 1, got {put_workers}")
        if max_queued_bytes < 1:
            raise ValueError(f"max_queued_bytes must be >= 1, got {max_queued_bytes}")
        self._max_queued_bytes = max_queued_bytes
        self.config = config
        self.metadata = metadata
        self.timeout = float(config.remote_timeout)
        self.retry = retry or RetryPolicy()
        self._connector_options = connector_options
        self._injected = connector is not None
        self.connector: RemoteConnector = connector or self._open_connector()
        self.display_url = self.connector.display_url or mask_url(config.remote_url or "")
        self.breaker = breaker or CircuitBreaker(name=self.display_url)
        self._refusals_warned: dict[str, float] = {}  # kind -> when (monotonic) last warned
        self.list_timeout = list_timeout if list_timeout is not None else 10 * self.timeout
        self.close_timeout = (
            close_timeout
            if close_timeout is not None
            else self.timeout * (self.breaker.failure_threshold + 2)
        )
        self._put_worker_count = put_workers
        self._closed = False
        self._connector_closing = False  # close() is closing the connector (see _failed)
        self._start_runtime()
        # Without close(), queued writes are stored at interpreter exit, as the disk tier's are.
        drain_at_exit(self)

    # -- lifecycle -----------------------------------------------------------------

    def _open_connector(self) -> RemoteConnector:
        from lmcache_core.storage_backend.connector.registry import connector_for

        assert self.config.remote_url is not None
        return connector_for(self.config.remote_url, timeout=self.timeout, **self._connector_options)

    def _start_runtime(self) -> None:
        """Locks, thread pools and queues: everything a forked child must rebuild."""
        self._lock = threading.Lock()
        # Set once close() has drained and released everything (a closed backend forked
        # stays closed: nothing to wait for in the child).
        self._close_done = _Signal()
        self._close_claim = itertools.count()  # the first next() runs the shutdown
        if self._closed:
            self._close_done.set()
        self._known = _KnownKeys(KNOWN_KEYS_MAX)
        # Keys whose latest write or remove here failed: the remote may still hold an
        # older chunk under them, which a get must not serve (a hybrid acknowledged the
        # newer put from its local tiers, then served the remote's older chunk once the
        # local copy was evicted). Misses until a put or remove of the key succeeds;
        # bounded as the known keys are (the oldest marks are forgotten first).
        self._stale = _KnownKeys(KNOWN_KEYS_MAX)
        # Chunks put_nonblocking queued that no writer has finished, bounded (backpressure).
        self._queued = QueuedBytes(self._lock, self._max_queued_bytes)
        self._pending: dict[CacheEngineKey, torch.Tensor] = {}
        self._writing: dict[CacheEngineKey, _Signal] = {}
        self._last_stored = 0.0  # monotonic time a background write last succeeded
        self._io = _DaemonPool(self._io_threads(), "lmcache-remote-io")
        # For chunks streamed from a local directory (connector.streams): warm buffers,
        # and checksum helpers of this store's own (a stalled mount must not hold up
        # the shared ones the disk tier uses).
        self._read_buffers = BufferPool("cpu", max_bytes=read_pool_bytes(self.metadata))
        self._hashers = _DaemonPool(2 if self.connector.streams else 0, "lmcache-remote-checksum")
        # One queue per writer; a key always goes to the same writer, so two
        # queued writes of one key land in the order they were made. Each writer
        # thread runs ``put_worker()`` (the seed's no-argument loop), which finds
        # its own queue in ``_queue_of_writer``, filled before the thread starts.
        # SimpleQueue: its put is one C call. queue.Queue.put, run by the caller, is Python
        # under a Condition: a KeyboardInterrupt in it left the queue's mutex held (the
        # writer and close() hung) or the item queued with no writer woken.
        self._put_queues: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(self._put_worker_count)]
        self._put_threads = [
            threading.Thread(target=self.put_worker, name=f"lmcache-remote-put-{i}", daemon=True)
            for i in range(self._put_worker_count)
        ]
        self._queue_of_writer: dict[threading.Thread, queue.SimpleQueue[Any]] = dict(
            zip(self._put_threads, self._put_queues, strict=True)
        )
        for t in self._put_threads:
            t.start()

    def _io_threads(self) -> int:
        return 16

    def _after_fork(self) -> None:
        logger.info("%s: forked process %d reopens its remote connection", self.display_url, os.getpid())
        if not self._injected:
            self.connector = self._open_connector()
        # Locks held by other parent threads at fork() stay held in the child: rebuild them.
        self.breaker.after_fork()
        stale = self._stale  # the remote's older chunks stay unserved here too (a hybrid's
        # memory tier came over with the newer ones), but not the marks of writes that
        # were only in flight on the parent's writer threads: no writer here ever clears
        # them, and those keys were misses in the child for good.
        in_flight = list(self._writing)
        self._start_runtime()
        for key in in_flight:
            stale.discard(key)
        self._stale = stale

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.describe()}: backend is closed")

    def describe(self) -> str:
        return f"remote {self.display_url}"

    def __repr__(self) -> str:
        # display_url is masked: never the password, key or token of the store.
        return f"{type(self).__name__}({self.display_url!r})"

    def close(self) -> None:
        """Drain queued writes, then release the connection. Idempotent.

        Runs by itself at interpreter exit for a backend never closed, as a thread
        pool's queued tasks run (``write_queue.drain_at_exit``).

        Every acknowledged write is stored as long as the remote keeps storing
        them: the drain gives up only after ``close_timeout`` seconds in which no
        queued write was stored. So it is bounded when the remote is dead (each
        write has its timeout and the circuit breaker makes the rest fail fast)
        but not cut short on a healthy remote with a long queue (a fixed total
        budget dropped 134 of 300 queued 4 MiB writes to a healthy S3 endpoint).
        Writes still queued when it gives up are dropped, logged and counted
        (``dropped_on_close``).
        """
        if self._pid != os.getpid():
            # A child that never used this backend: nothing of its own to drain, and the
            # lock may be one a parent thread held at fork() (never released here).
            self._closed = True
            return
        with self._lock:  # put_nonblocking queues under it: none lands after the end signals
            self._closed = True
            self._queued.wake_all_locked()  # a put waiting for room raises now
        if not self._close_done.is_set():
            # The shutdown runs on a thread of its own, once (the first to claim it), and
            # every close() waits for it: one interrupted (Ctrl-C) before or while it ran
            # left it undone, or done in part with later calls returning at once while
            # acknowledged writes were still queued. Now an interrupt ends only the wait,
            # and the next close() (the exit drain's too) waits for the same shutdown.
            try:
                _thread.start_new_thread(self._close_once, ())
            except RuntimeError:  # no new threads (interpreter exit): shut down here
                self._close_once()
        self._close_done.wait()

    def _close_once(self) -> None:
        """``_shut_down`` by the first caller only; then wakes every ``close()``."""
        if next(self._close_claim) != 0:
            return
        try:
            self._shut_down()
        except Exception:
            logger.exception("%s: closing failed", self.display_url)
        finally:
            self._close_done.set()

    def _shut_down(self) -> None:
        """``close()``'s work, run once, by the first caller."""
        started = time.monotonic()
        for q in self._put_queues:
            q.put(RemoteBackendEndSignal())
        while alive := [t for t in self._put_threads if t.is_alive()]:
            quiet_until = max(started, self._last_stored) + self.close_timeout
            left = quiet_until - time.monotonic()
            if left <= 0:
                break
            alive[0].join(timeout=min(left, 0.1))  # re-check progress at least every 0.1 s
        if any(t.is_alive() for t in self._put_threads):
            with self._lock:
                dropped = len(self._pending)
                self._pending.clear()
            self.stats.incr("dropped_on_close", dropped)
            logger.error(
                "%s: close() gave up with %d queued writes not stored (none stored in the last %.1fs)",
                self.display_url,
                dropped,
                self.close_timeout,
            )
        self._io.shutdown()
        self._hashers.shutdown()
        self._read_buffers.clear()  # views already handed out stay valid
        self._connector_closing = True
        # Closing a client may itself touch the network; never wait long for it.
        closer = threading.Thread(target=self._close_connector, name="lmcache-remote-close", daemon=True)
        closer.start()
        closer.join(timeout=min(self.timeout, 2.0))
        forget_at_exit(self)

    def _close_connector(self) -> None:
        try:
            self.connector.close()
        except Exception:
            logger.debug("%s: closing the connector failed", self.display_url, exc_info=True)

    # -- the one way every remote call is made -------------------------------------

    def _attempts(
        self,
        what: str,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        deadline: float,
        retry: bool,
        tried: int = 0,
        strikes: _Strikes | None = None,
    ) -> T:
        """Run ``fn`` with retries (if ``retry``) until it succeeds or time runs out.

        Runs on an I/O thread; the caller waits with the same deadline. Every
        outcome is reported to the circuit breaker. ``tried``: attempts the caller
        already made elsewhere (an inline put), counted against the policy's.
        ``strikes``: the call's, shared with the caller's wait (``_await``).
        """
        attempts = self.retry.attempts if retry else 1
        for attempt in range(min(tried, attempts - 1), attempts):
            if attempt > 0 and not self.breaker.allow():
                raise StoreUnavailableError(self.display_url, f"{what}: {self.breaker.why_open()}")
            started = time.monotonic()
            try:
                result = fn(*args)
            except WriteAbandonedError:
                raise  # its caller is gone, and nothing went wrong with the remote
            except _ANSWERS as exc:
                # The remote is up and said no (full, access denied): not an
                # outage, so neither a retry nor a strike against the circuit.
                self.breaker.record_success()
                self._log_refusal(what, exc)
                raise
            except Exception as exc:
                pause = self._failed(what, exc, attempt, attempts, started, deadline, strikes)
                if pause is None:
                    raise
                time.sleep(pause)
                continue
            self.breaker.record_success()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _log_refusal(self, what: str, exc: BaseException) -> None:
        """A refusal as a warning once every ``REFUSAL_WARN_EVERY_S`` per kind, else at
        debug. Thread-safe (a race costs at most one more line)."""
        kind = type(exc).__name__
        now = time.monotonic()
        last = self._refusals_warned.get(kind)
        if last is None or now - last >= REFUSAL_WARN_EVERY_S:
            self._refusals_warned[kind] = now
            logger.warning(
                "%s: %s refused: %s (such refusals are logged once a minute)",
                self.display_url, what, mask_secrets_in(str(exc) or kind),
            )
        else:
            logger.debug("%s: %s refused: %s", self.display_url, what, mask_secrets_in(str(exc) or kind))

    def _failed(
        self,
        what: str,
        exc: Exception,
        attempt: int,
        attempts: int,
        started: float,
        deadline: float,
        strikes: _Strikes | None = None,
    ) -> float | None:
        """Count a failed attempt against the remote; the pause before the next, or None if none may follow.

        A retry follows only if a try as slow as this one still ends before the
        deadline. One that cannot is abandoned by its caller mid-send, and a write
        could then land after the caller's next put of the same key and undo it.
        """
        if self._connector_closing:
            # close() ends the calls still under way (it closes the connector under them,
            # once its queued writes are drained): no word on the remote, so no strike.
            return None
        # The cause, for the errors of calls the open circuit refuses: our own errors
        # already name the remote; others get their type ("ConnectionError: ...").
        cause = str(exc) if isinstance(exc, LMCacheError) else f"{type(exc).__name__}: {exc}"
        # Past the deadline the caller's wait has struck (or will) for this call: once.
        if strikes is None or not strikes.gave_up(deadline) or strikes.first():
            self.breaker.record_failure(mask_secrets_in(f"{what}: {cause}")[:300])  # masked whole, then cut
        self.stats.incr("remote_errors")
        pause = self.retry.delay(attempt)
        took = time.monotonic() - started
        last = attempt >= attempts - 1 or time.monotonic() + pause + took >= deadline
        logger.debug("%s: %s failed (attempt %d): %r", self.display_url, what, attempt + 1, exc)
        if last or self.breaker.state == OPEN:
            return None
        self.stats.incr("retries")
        return pause

    def _admit(self, what: str) -> None:
        """Fail fast while the circuit is open (counted in ``circuit_rejections``)."""
        if not self.breaker.allow():
            self.stats.incr("circuit_rejections")
            raise StoreUnavailableError(self.display_url, f"{what}: {self.breaker.why_open()}")

    def _no_answer(self, what: str) -> StoreUnavailableError:
        """The error for a call whose deadline passed (counted in ``timeouts``)."""
        self.stats.incr("timeouts")
        return StoreUnavailableError(self.display_url, f"{what}: no answer within the timeout")

    def _submit(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        retry: bool,
        timeout: float | None = None,
        admitted: bool = False,
        tried: int = 0,
    ) -> tuple[_CallFuture[T], float]:
        """Start a remote call on an I/O thread; fail fast while the circuit is open.

        ``admitted``: the caller already has the breaker's leave for this call (asking
        again in half-open state would be refused: one probe at a time). ``tried``:
        attempts already made (``_attempts``).
        """
        self._check_fork()
        if not admitted:
            self._admit(what)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        strikes = _Strikes()
        future: _CallFuture[T] = _CallFuture(strikes)
        self._io.submit(self._attempts, what, fn, args, deadline, retry, tried, strikes, deadline=deadline, future=future)
        return future, deadline

    def _await(self, what: str, future: _CallFuture[T], deadline: float) -> T:
        """The call's result, or ``StoreUnavailableError`` at the deadline (the call may hang on)."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as exc:
            ran = future.done() and future.exception() is exc and not isinstance(exc, _QueuedPastDeadlineError)
            # A TimeoutError the call raised itself was struck by _attempts already.
            if not ran:
                future.cancel()
                if future.strikes.first():
                    self.breaker.record_failure(f"{what}: no answer in time")
            raise self._no_answer(what) from None
        except LMCacheError:
            raise
        except Exception as exc:
            raise StoreUnavailableError(self.display_url, f"{what}: {exc!r:.200}") from exc

    def _call(self, what: str, fn: Callable[..., T], *args: Any, retry: bool, timeout: float | None = None) -> T:
        """Call ``fn(*args)`` on the remote with a hard timeout, retries and the breaker.

        Raises:
            StoreUnavailableError: timeout, open circuit, or a transport failure.
        """
        future, deadline = self._submit(what, fn, *args, retry=retry, timeout=timeout)
        return self._await(what, future, deadline)

    # -- writes --------------------------------------------------------------------

    def put(self, key: CacheEngineKey, kv_chunk: torch.Tensor, blocking: bool = True) -> None:
        """Store a chunk; ``blocking=False`` queues it for a background writer
        (``put_nonblocking``: it may wait for room in a full queue).

        Raises:
            StoreUnavailableError: (blocking) the remote did not take the chunk;
                (non-blocking) the write queue stayed full.
            RuntimeError: the backend is closed.
        """
        if blocking:
            self.put_blocking(key, kv_chunk)
        else:
            self.put_nonblocking(key, kv_chunk)

    def _check_put(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """What every put checks first (each of the seed's put methods is public)."""
        check_key(key)
        check_chunk(kv_chunk)
        self._check_open()
        self._check_fork()

    def put_blocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """Store now, bounded by ``remote_timeout``. Thread-safe."""
        self._check_put(key, kv_chunk)
        self._supersede(key)  # marks the key stale first: see _mark_stale
        self._write(key, kv_chunk)

    def start_put(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> Callable[[], None]:
        """A blocking put in two halves: send now on an I/O thread, wait with what this returns.

        The caller may do other work in between (the hybrid writes its local tiers
        while the chunk is on its way) but must call the returned function, and
        must not modify ``kv_chunk`` until it has returned. Thread-safe.

        Returns:
            The wait: returns once the remote has stored the chunk; bounded by
            ``remote_timeout``, as ``put`` is. A send that a hung server holds past
            it may still read ``kv_chunk``, as with ``put``, but is abandoned:
            nothing hashed after that is published or retried, and bytes changed
            while they are sent fail their checksum on read.

        Raises:
            ValueError: a bad key or chunk (before anything is sent).
            RuntimeError: the backend is closed.
            StoreUnavailableError: the circuit is open (here), or the remote failed
                or timed out (from the wait).
        """
        self._check_put(key, kv_chunk)
        self._supersede(key)  # marks the key stale first: see _mark_stale
        return self._start_write(key, kv_chunk)

    def put_nonblocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """Queue the write; the caller must not modify ``kv_chunk`` until it is stored.

        Once ``max_queued_bytes`` are queued, waits for queued writes to finish
        (backpressure: acknowledged only once queued). Thread-safe.

        Raises:
            StoreUnavailableError: no room, and no queued write finished for three ``remote_timeout``s.
            RuntimeError: the backend is closed (also while waiting).
        """
        self._check_put(key, kv_chunk)
        for_library_threads(kv_chunk)  # a writer copies it to the host on its own stream
        nbytes = kv_chunk.numel() * kv_chunk.element_size()
        work = self._put_queues[zlib.crc32(key.chunk_hash.encode()) % len(self._put_queues)]
        item = (key, kv_chunk, nbytes)
        with self._lock:
            # Checked under the lock close() sets it under: a put that raced close()
            # is queued before the end signals (and drained) or raises.
            self._check_open()
            self._wait_for_room_locked(nbytes)
            # A KeyboardInterrupt may land at any call here: the bytes are counted, then
            # the key is registered (taken back if interrupted), then the write is queued
            # by one C call, with no call between (so nothing is counted that no writer
            # will take back, and no key waits in _pending for a write never queued).
            self._queued.add_locked(nbytes)
            try:
                self._pending[key] = kv_chunk
            except BaseException:
                self._queued.done_locked(nbytes)
                raise
            work.put(item)

    def _wait_for_room_locked(self, nbytes: int) -> None:
        """Under ``_lock``: wait until ``nbytes`` more fit in the write queue (backpressure).

        Writes that fail finish too, so the wait ends as the queue drains either way.

        Raises:
            StoreUnavailableError: no queued write finished for three ``remote_timeout``s.
            RuntimeError: the backend was closed meanwhile.
        """
        self._queued.wait_for_room_locked(
            nbytes,
            stall_s=3 * self.timeout,
            closed=lambda: self._closed,
            stalled=lambda why: StoreUnavailableError(self.display_url, f"put: {why}"),
            stats=self.stats,
        )

    def put_worker(self) -> None:
        """The loop each background writer thread runs (LMCache's ``put_worker``).

        Stores the chunks queued for this writer by ``put(blocking=False)``, one
        after another in the order they were queued (so writes of one key land in
        order), until a ``RemoteBackendEndSignal``, which ``close()`` queues after
        everything already acknowledged. A failed write is logged and counted
        (``background_put_failures``); the loop goes on.

        Raises:
            RuntimeError: called on a thread that is not one of this backend's
                writers (each writer owns one queue; a stranger would break the
                per-key order).
        """
        work = self._queue_of_writer.get(threading.current_thread())
        if work is None:
            raise RuntimeError(
                f"{self.describe()}: put_worker() is the loop of the backend's own writer threads "
                "(started by the constructor); use put(..., blocking=False) to queue a write"
            )
        while True:
            item = work.get()
            if isinstance(item, RemoteBackendEndSignal):
                return
            key, chunk, nbytes = item
            try:
                self._write_queued(key, chunk)
            finally:
                with self._lock:
                    self._queued.done_locked(nbytes)

    def _write_queued(self, key: CacheEngineKey, chunk: torch.Tensor) -> None:
        """One queued write, unless removed or superseded since; failures logged and counted."""
        with self._lock:
            if self._pending.get(key) is not chunk:
                return  # removed or superseded while queued
            done = self._writing[key] = _Signal()
        try:
            self._mark_stale(key)
            self._write(key, chunk)
            self._last_stored = time.monotonic()  # close() drains while writes land
        except Exception as exc:
            self.stats.incr("background_put_failures")
            if isinstance(exc, _ANSWERS):
                # A full or refusing store refuses every put alike: a line each flooded
                # the log (one per chunk the engine stored), where one a minute says it.
                self._log_refusal("background put", exc)
            else:
                logger.error("%s: background put of %s failed: %s", self.display_url, key, exc)
        finally:
            with self._lock:
                if self._pending.get(key) is chunk:
                    del self._pending[key]
                self._writing.pop(key, None)
            done.set()

    def _write(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """Store now (the caller marked ``key`` stale first: ``_mark_stale``)."""
        chunk = chunk_format.UnsealedChunk(kv_chunk, key.to_string())
        if self.connector.puts_inline(chunk.size):
            self._put_inline(key, chunk)
        else:
            self._write_by_io_thread(key, chunk)

    def _put_inline(self, key: CacheEngineKey, chunk: chunk_format.UnsealedChunk) -> None:
        """Store ``chunk`` on this thread, the connector bounding each wait by the deadline.

        Saves handing the chunk to an I/O thread and waiting for it (on a 2-core host
        those two wake-ups cost about a fifth of a 2 MiB Redis ``SET``). One try here;
        where the connector cannot start one (no open connection free) or it fails
        with time to spare, the put goes on by an I/O thread, with its retries, in
        the time left. Breaker, stats and errors as for any put.
        """
        self._check_fork()
        try:
            self._admit("put")
        except StoreUnavailableError:
            self._write_failed(key)
            raise
        try:
            sent, tried, deadline = self._one_try_here("put", self.connector.put_chunk_by, key, chunk)
        except Exception:
            self._write_failed(key)
            raise
        if sent:
            self._stored(key)
            return
        # Still the call the breaker let through above (in half-open state, its one probe).
        self._write_by_io_thread(key, chunk, timeout=deadline - time.monotonic(), admitted=True, tried=tried)

    def _one_try_here(self, what: str, fn: Callable[..., T], *args: Any) -> tuple[T | None, int, float]:
        """One try of a connector's ``*_by`` call on this thread (``fn(*args, deadline)``),
        after the breaker admitted it: (its result, or None when it failed with time to
        spare; tries made; the deadline). A result that says it could not start (False,
        None) is no success for the breaker.

        Raises:
            StoreUnavailableError: it failed and no retry may follow (timeout, open
                circuit, or too little time left); ``_ANSWERS``: the remote said no.
        """
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            result = fn(*args, deadline)
        except _ANSWERS:
            self.breaker.record_success()  # the remote is up and said no (full, denied)
            raise
        except Exception as exc:
            pause = self._failed(what, exc, 0, self.retry.attempts, started, deadline)
            if pause is None:
                if _timed_out(exc):
                    raise self._no_answer(what) from exc
                if isinstance(exc, LMCacheError):
                    raise
                raise StoreUnavailableError(self.display_url, f"{what}: {exc!r:.200}") from exc
            time.sleep(pause)
            return None, 1, deadline
        if result is not None and result is not False:
            self.breaker.record_success()
        return result, 0, deadline

    def _start_write(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> Callable[[], None]:
        """Submit the write of ``kv_chunk`` to an I/O thread; the returned function awaits it."""
        chunk = chunk_format.UnsealedChunk(kv_chunk, key.to_string())
        try:
            future, deadline = self._submit_put(key, chunk)
        except BaseException:
            # Also a KeyboardInterrupt once the write was queued: the caller is told it
            # failed and may change the tensor, so nothing hashed from now on is published.
            self._write_abandoned(key, chunk)
            raise

        def finish() -> None:
            try:
                self._await("put", future, deadline)
            except BaseException:
                # A send still running must not publish what the caller changes next: also
                # when Ctrl-C ends the wait (a reused buffer was stored as a mix of two
                # chunks under a valid checksum, a wrong tensor for every later get).
                self._write_abandoned(key, chunk)
                raise
            self._stored(key)

        finish.abandon = chunk.abandon  # type: ignore[attr-defined]  # for a caller interrupted before it waits
        return finish

    def _write_by_io_thread(
        self,
        key: CacheEngineKey,
        chunk: chunk_format.UnsealedChunk,
        timeout: float | None = None,
        admitted: bool = False,
        tried: int = 0,
    ) -> None:
        """``_start_write`` and its wait in one ``try``: a KeyboardInterrupt landing between
        the two (as the wait was called) left the send unabandoned, and the caller's next
        bytes in its buffer could be hashed and stored under ``key``."""
        try:
            future, deadline = self._submit_put(key, chunk, timeout=timeout, admitted=admitted, tried=tried)
            self._await("put", future, deadline)
        except BaseException:
            self._write_abandoned(key, chunk)
            raise
        self._stored(key)

    def _submit_put(
        self, key: CacheEngineKey, chunk: chunk_format.UnsealedChunk, **limits: Any
    ) -> tuple[Any, float]:
        """The put of ``chunk`` on an I/O thread, retried; (its future, its deadline)."""
        return self._submit("put", self.connector.put_chunk, key, chunk, retry=True, **limits)

    def _write_abandoned(self, key: CacheEngineKey, chunk: chunk_format.UnsealedChunk) -> None:
        """A write whose caller was told it failed: nothing hashed from now on is published."""
        chunk.abandon()
        self._write_failed(key)

    def _stored(self, key: CacheEngineKey) -> None:
        """Bookkeeping of a put the remote has acknowledged."""
        with self._lock:
            self._known.add(key)
            self._stale.discard(key)
        self.stats.incr("puts")

    def _write_failed(self, key: CacheEngineKey) -> None:
        """Bookkeeping of a put that failed: the remote may hold an older chunk of ``key``
        (or, for a send given up on, the new one later), so reads of it are misses.

        Marks again what ``_mark_stale`` marked before the write: a put of the key
        that succeeded meanwhile cleared the mark."""
        self._mark_stale(key)
        self.stats.incr("put_failures")

    def _mark_stale(self, key: CacheEngineKey) -> None:
        """``key``'s reads are misses until a put or remove of it succeeds here.

        Set before every write and remove, not only once one fails: a KeyboardInterrupt
        can land anywhere in a write or in its failure's bookkeeping, and the key must
        then read as a miss, never as the older chunk the remote may still hold (a
        hybrid's local tiers may have the newer one). ``_stored`` clears it.
        """
        with self._lock:
            self._stale.add(key)  # first: one step, see _KnownKeys
            self._known.discard(key)

    def _stale_miss(self, key: CacheEngineKey) -> bool:
        """Whether ``key``'s latest write or remove here failed (see ``_stale``): then
        whatever the remote holds under it may be older, and reads are misses."""
        if not self._stale:  # nothing marked (the usual case): no second lock per get
            return False
        with self._lock:
            if key not in self._stale:
                return False
        self.stats.incr("stale_misses")
        return True

    def _supersede(self, key: CacheEngineKey) -> bool:
        """Mark ``key`` stale (``_mark_stale``), drop a queued write of it and wait for one
        in flight; True if one was queued. Called before a put or remove of ``key``.

        The wait is a ``_Signal``'s: an interrupted ``threading.Event.wait`` could leave
        its lock held, and the writer then hung in ``set()`` for good (its queued bytes
        never taken back, close() giving up on the writes queued behind it)."""
        with self._lock:
            # First, in the one lock hold that also looks for a queued write: a mark made
            # in a hold of its own let a queued write of the key finish in between and
            # clear it (and make the key known), and a remove then left the key known
            # after deleting it, or served it after failing to.
            self._stale.add(key)
            self._known.discard(key)
            was_pending = self._pending.pop(key, None) is not None
            writing = self._writing.get(key)
        if writing is not None:
            writing.wait(timeout=self.timeout * 2)
            # The write that finished cleared the caller's mark (and made the key known);
            # the caller's own put or remove is still to come.
            self._mark_stale(key)
        return was_pending

    # -- reads ---------------------------------------------------------------------

    def _pending_copy(self, key: CacheEngineKey) -> torch.Tensor | None:
        with self._lock:
            chunk = self._pending.get(key)
        # A copy: the caller may modify what get() returns, the queued write must not change.
        return chunk.detach().clone() if chunk is not None else None

    def get(self, key: CacheEngineKey) -> torch.Tensor | None:
        """The chunk on ``dst_device``; ``None`` when absent, corrupt, or the remote is down."""
        check_key(key)
        self._check_fork()
        self._check_open()
        try:
            return self._get(key)
        except StoreUnavailableError as exc:
            logger.debug("%s", exc)
            self.stats.incr("unavailable")
            self.stats.incr("misses")
            return None

    def _get(self, key: CacheEngineKey, *, ask_remote: bool = True) -> torch.Tensor | None:
        """``get``; ``ask_remote=False``: only a write still queued here can answer."""
        pending = self._pending_copy(key)
        if pending is not None:
            self.stats.incr("hits")
            return self._to_dst(pending)
        if not ask_remote or self._stale_miss(key):
            self.stats.incr("misses")
            return None
        if self.connector.streams:
            (tensor,) = self._call("get", self._read_streams, [key], retry=True)
            if tensor is None:
                self.stats.incr("misses")
                return None
            tensor = self._to_dst(tensor)
            self.stats.incr("hits")
            return tensor
        blob, digest = self._get_hashed(key)
        return self.deserialize(key, blob, digest)

    def _get_hashed(self, key: CacheEngineKey) -> tuple[bytes | None, str | None]:
        """The connector's ``get_hashed``: on this thread where it can bound the call by
        the deadline itself (``gets_inline``), else by an I/O thread.

        As ``_put_inline``: one try here, sparing the two thread hand-offs (about 45 us,
        most of what a 2 MiB Redis get lost to raw redis-py); where the connector cannot
        start one, or it fails with time to spare, the get goes on by an I/O thread,
        with its retries, in the time left. Breaker, stats and errors as for any get.
        """
        if not self.connector.gets_inline():
            return self._call("get", self.connector.get_hashed, key, retry=True)
        self._admit("get")  # (get and batched_get checked the fork already)
        got, tried, deadline = self._one_try_here("get", self.connector.get_hashed_by, key)
        if got is not None:
            return got
        # Still the call the breaker let through above (in half-open state, its one probe).
        future, deadline = self._submit(
            "get",
            self.connector.get_hashed,
            key,
            retry=True,
            timeout=deadline - time.monotonic(),
            admitted=True,
            tried=tried,
        )
        return self._await("get", future, deadline)

    def _read_streams(self, keys: Sequence[CacheEngineKey], helper: Any = None) -> list[torch.Tensor | None]:
        """Chunks of a streaming connector (a local directory), aligned with ``keys``.

        Each is read into a warm buffer and checked piece by piece as it is read, like
        the disk tier's get (32 MiB: ~30 ms through ``get``'s bytes and a whole-object
        decode, ~7 ms this way, on a 2-core VM). Absent or corrupt -> ``None``, and
        forgotten (corrupt ones counted and logged). ``get`` and the pipelined
        ``batched_get`` both read this way.
        """
        out: list[torch.Tensor | None] = []
        for key in keys:
            try:
                tensor = self._read_stream(key, helper)
            except CorruptChunkError as exc:
                self._forget_corrupt(key, exc)
                tensor = None
            if tensor is None:
                with self._lock:
                    self._known.discard(key)
            out.append(tensor)
        return out

    def _read_stream(self, key: CacheEngineKey, helper: Any = None) -> torch.Tensor | None:
        f = self.connector.open_stream(key)
        if f is None:
            return None
        with f:
            return chunk_format.read_chunk(
                f,
                key.to_string(),
                self._read_buffers.acquire,
                total_size=os.fstat(f.fileno()).st_size,
                helper=self._hashers if helper is None else helper,
            )

    def batched_get(self, keys: Iterable[CacheEngineKey]) -> list[torch.Tensor | None]:
        """One ``get`` after another; once the remote fails, the rest are misses at once
        (but for writes still queued here: read-your-writes holds as for ``get``).

        So a batch against a dead remote costs one timeout, not one per key.
        """
        keys = [check_key(k) for k in keys]
        self._check_fork()
        self._check_open()
        results: list[torch.Tensor | None] = []
        down = False
        for key in keys:
            try:
                results.append(self._get(key, ask_remote=not down))
            except StoreUnavailableError as exc:
                logger.debug("%s", exc)
                self.stats.incr("unavailable")
                self.stats.incr("misses")
                results.append(None)
                down = True
        return results

    def deserialize(self, key: CacheEngineKey, blob: bytes | None, digest: str | None = None) -> torch.Tensor | None:
        """Fetched bytes -> tensor on ``dst_device`` (zero-copy on CPU); misses are ``None``.

        ``digest``: the payload's checksum if the connector hashed it as it arrived.
        """
        tensor = self._decode_blob(key, blob, digest)
        self.stats.incr("hits" if tensor is not None else "misses")
        return tensor

    def _decode_blob(
        self,
        key: CacheEngineKey,
        blob: bytes | None,
        digest: str | None = None,
        *,
        stream: torch.cuda.Stream | None = None,
    ) -> torch.Tensor | None:
        """``deserialize`` without the hit/miss count (the caller counts what it returns).

        ``stream``: the caller's, when a decode thread runs this for it.

        A missing or corrupt object is forgotten from the known set; a corrupt
        one is counted (``corrupt``) and logged.
        """
        if blob is None:
            with self._lock:
                self._known.discard(key)
            return None
        if isinstance(blob, bytes) and len(blob) >= _POOLED_COPY_MIN_BYTES:
            # Immutable (fsspec stores other than S3 hand over bytes): decode would copy
            # the payload into fresh memory, whose page faults cost more than the copy
            # into a warm pooled buffer (~16 ms against ~2 ms for 32 MiB).
            array: Any = self._read_buffers.acquire(len(blob)).numpy()  # a buffer; numpy's stubs do not say so
            warm = memoryview(array).cast("B")
            warm[:] = blob
            blob = warm  # type: ignore[assignment]
        try:
            tensor = chunk_format.decode(blob, key.to_string(), digest=digest)
        except CorruptChunkError as exc:
            self._forget_corrupt(key, exc)
            return None
        return self._to_dst(tensor, stream)

    def _forget_corrupt(self, key: CacheEngineKey, exc: CorruptChunkError) -> None:
        with self._lock:
            self._known.discard(key)
        self.stats.incr("corrupt")
        logger.warning("%s: object for %s is not a valid chunk, treated as a miss: %s", self.display_url, key, exc)

    def contains(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is stored: known keys answer at once (no, while the circuit is
        open), others ask the remote."""
        check_key(key)
        self._check_fork()
        self._check_open()
        with self._lock:
            if key in self._pending:
                return True
            if key in self._stale:
                return False  # what the remote holds may be older than the failed write
            known = key in self._known
        if known:
            if self.breaker.retry_after() > 0:
                # The remote is down (circuit open, cooling down): a get would be a miss,
                # so a lookup that counted its known keys claimed tokens it could not
                # return. Past the cooldown a get may probe, and the key counts again.
                self.stats.incr("unavailable")
                return False
            return True
        try:
            found = bool(self._call("exists", self.connector.exists, key, retry=True))
        except StoreUnavailableError as exc:
            logger.debug("%s", exc)
            self.stats.incr("unavailable")
            return False
        if found:
            with self._lock:
                if key not in self._stale:  # a write that failed meanwhile
                    self._known.add(key)
        return found

    def remove(self, key: CacheEngineKey) -> bool:
        """Delete ``key``; True if it was stored (or queued).

        Raises:
            StoreUnavailableError: the remote did not answer.
        """
        check_key(key)
        self._check_fork()
        self._check_open()
        # Until the delete is done the remote may still hold the chunk: a caller that goes
        # on (a hybrid, whose local tiers did drop it) must not read it back, also when
        # the delete failed or a KeyboardInterrupt ended it anywhere (marked first).
        was_pending = self._supersede(key)  # marks the key stale first
        removed = bool(self._call("delete", self.connector.delete, key, retry=False))
        with self._lock:
            self._stale.discard(key)
        return removed or was_pending

    def list_info(self) -> builtins.list[ChunkInfo]:
        """Listed chunks with size and mtime (foreign objects skipped); refreshes the known set.

        Raises:
            StoreUnavailableError: the listing failed or took longer than ``list_timeout``.
        """
        self._check_open()
        self._check_fork()
        objects = self._call(
            "list", lambda: list(self.connector.list()), retry=True, timeout=self.list_timeout
        )
        infos = [ChunkInfo(o.key, o.size, o.mtime) for o in objects]
        seen = {i.key for i in infos}
        with self._lock:
            pending = [k for k in self._pending if k not in seen]
            self._known.replace(seen)
        return infos + [ChunkInfo(k) for k in pending]

    def list(self) -> builtins.list[CacheEngineKey]:
        """Every stored key (and queued ones); also refreshes the cached set of known keys."""
        return [info.key for info in self.list_info()]

    def list_rank_info(self, fmt: str, model_name: str, world_size: int, worker_id: int) -> builtins.list[ChunkInfo]:
        """The stored chunks of one model, fmt and rank, listed by their prefix only
        (other models' objects are not scanned); queued writes are not included.

        Raises:
            StoreUnavailableError: the listing failed or took longer than ``list_timeout``.
        """
        self._check_open()
        self._check_fork()
        objects = self._call(
            "list",
            lambda: list(self.connector.list_rank(fmt, model_name, world_size, worker_id)),
            retry=True,
            timeout=self.list_timeout,
        )
        infos = [ChunkInfo(o.key, o.size, o.mtime) for o in objects]
        with self._lock:
            self._known.update(i.key for i in infos)
        return infos

    def read_header(self, key: CacheEngineKey) -> ChunkHeader | None:
        """The chunk's header from a ranged read of its first bytes (payload not fetched).

        None when absent, unreadable, another key's, when the object's size is not
        header + payload (truncated or padded), or when the remote did not answer.
        """
        try:
            return self.fetch_header(key)
        except StoreUnavailableError as exc:
            logger.debug("%s: no header for %s: %s", self.display_url, key, exc)
            return None

    def fetch_header(self, key: CacheEngineKey) -> ChunkHeader | None:
        """``read_header``, for tools: an outage raises instead of reading as a bad chunk
        (``lmcache ls -l`` showed every chunk "unreadable" while S3 stalled).

        Raises:
            StoreUnavailableError: no answer within ``remote_timeout``, open circuit,
                or a transport failure.
        """
        check_key(key)
        self._check_fork()
        self._check_open()
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None:
            return chunk_format.parse_header(chunk_format.encode_header(pending.detach().cpu(), key.to_string()))
        if self._stale_miss(key):
            return None
        try:
            got = self._call("get_head", self.connector.get_head, key, HEADER_PROBE_BYTES, retry=True)
            if got is None:
                return None
            head, size = got
            need = chunk_format.header_length(head)
            if len(head) < need <= size:
                got = self._call("get_head", self.connector.get_head, key, need, retry=True)
                if got is None:
                    return None
                head, size = got
            header = chunk_format.parse_header(head, total_size=size)
            chunk_format.check_identity(header, key.to_string())
            return header
        except CorruptChunkError as exc:
            logger.debug("%s: no header for %s: %s", self.display_url, key, exc)
            return None

    def fetch_bytes(self, key: CacheEngineKey) -> bytes | None:
        """The stored object as it is (neither decoded nor checked); None when absent.

        For tools that check chunks themselves (``lmcache verify``/``show``): unlike
        ``get``, an outage raises rather than reading as a miss, so it is never
        mistaken for a corrupt or missing chunk. Writes queued in this process are
        not consulted.

        Raises:
            StoreUnavailableError: no answer within ``remote_timeout``, open circuit,
                or a transport failure.
        """
        check_key(key)
        self._check_fork()
        self._check_open()
        return self._call("get", self.connector.get, key, retry=True)


#: How many ``remote_timeout``s a ``batched_get`` may wait in the fetch queue, behind
#: other callers' batches, before a fetch thread takes it up (then it ends as misses).
START_WAIT_TIMEOUTS = 10


class _BatchCall:
    """One ``batched_get`` in flight through the fetch and decode stages.

    Its keys (``to_fetch``, indices into ``keys``) are handed to the fetch stage in
    groups formed as they are handed out, so a group's size follows what the
    batch's first groups showed of the value size (``group_size``). ``start``
    hands the first ``window`` to the fetch stage, and each fetch thread then takes
    the call's next group itself (``take_next``). A stage finishes a group with
    ``finish``.

    The deadline is ``timeout`` after the latest progress (a group fetched or
    finished; a failed group is no progress), not after the start: a batch that a
    live remote serves group after group may take many timeouts in all, while one
    that makes no progress for ``timeout`` (a dead or hung remote) ends then. The
    caller waits in ``wait`` until every key is finished or the deadline passes;
    from then on the call is *closed*: no group is handed out, any late ``finish``
    is refused, so the caller's results never change under it and a group is
    counted (hit, miss or timeout) exactly once. Thread-safe.
    """

    def __init__(
        self,
        keys: Sequence[CacheEngineKey],
        to_fetch: Sequence[int],
        group_size: Callable[[_BatchCall], int],
        timeout: float,
        submit: Callable[[_BatchCall, int], None],
        window: int,
    ) -> None:
        self.keys = keys
        self.to_fetch = to_fetch
        self.groups: list[Sequence[int]] = []  # appended under the lock, never changed
        self.timeout = timeout
        now = time.monotonic()
        self.deadline = now + timeout
        # Until a fetch thread first takes up the call, it only waits in the fetch queue
        # behind other callers' batches: not the remote failing to answer. A third
        # caller behind two long batches got all misses from a healthy remote, and a
        # strike against its circuit. Waiting to start is bounded too.
        self.started = False
        self.stream: torch.cuda.Stream | None = None  # the caller's, for GPU copies made for it
        self.start_by = now + timeout * START_WAIT_TIMEOUTS
        self.aborted = False  # the backend closed while the call was in flight
        self.results: list[torch.Tensor | None] = [None] * len(keys)
        self.window = max(1, window)
        # Keys per group when nothing better is known: the batch split evenly over the window.
        self.even_size = max(1, math.ceil(len(to_fetch) / self.window))
        self._group_size = group_size
        self._unfinished: set[int] = set()
        self._closed = False
        # A plain lock and a bare "bell" lock, not a Condition: a KeyboardInterrupt in the
        # caller's Condition calls left its lock held (every fetch and decode thread that
        # touched the call then hung for good) or released twice (a RuntimeError replaced
        # the interrupt). The stages ring the bell (release it) on every change the
        # caller's wait must see; the caller takes it to wait.
        self._mutex = threading.Lock()
        self._bell = _thread.allocate_lock()
        self._bell.acquire()
        self._submit = submit
        self._next = 0  # index into to_fetch of the next key to hand out
        # The call's one strike for running out of time: taken by the caller at the
        # deadline, or by a fetch that fails after it (not both).
        self.strikes = _Strikes(self.wanted)

    def start(self) -> None:
        """Hand the first ``window`` groups to the fetch stage."""
        for _ in range(self.window):
            gid = self.take_next()
            if gid is None:
                return
            self._submit(self, gid)

    def _live(self) -> bool:
        """Not closed and the deadline not passed (exact with the lock held: only then
        can no progress move the deadline meanwhile)."""
        return not self._closed and time.monotonic() < self._end()

    def _end(self) -> float:
        return self.deadline if self.started else max(self.deadline, self.start_by)

    def abort(self) -> None:
        """End the call now (its backend closed): the caller's ``wait`` returns at once."""
        with self._mutex:
            if not self._closed:
                self.aborted = True
                self._ring()

    def mark_started(self) -> None:
        """A fetch thread took up the call: from now on its clock is the remote's."""
        with self._mutex:
            if not self.started and self._live():
                self.started = True
                self.deadline = time.monotonic() + self.timeout
                self._ring()  # the caller's wait recomputes its deadline

    def take_next(self) -> int | None:
        """The next group, formed now (None: no keys left, or the caller gave up).

        A fetch thread that finished one group of this call takes the next itself,
        so at most ``window`` groups are fetched at once and no other thread has to
        be woken for it (a handoff per group cost more than a fifth of the batch's
        throughput with 2 MiB Redis values).
        """
        with self._mutex:
            if not self._live() or self._next >= len(self.to_fetch):
                return None
            size = max(1, self._group_size(self))
            gid = len(self.groups)
            group = self.to_fetch[self._next : self._next + size]
            self.groups.append(group)
            self._next += len(group)
            self._unfinished.add(gid)
            return gid

    def group_keys(self, gid: int) -> list[CacheEngineKey]:
        return [self.keys[i] for i in self.groups[gid]]

    def wanted(self) -> bool:
        """False once the caller has its answer or the deadline passed: skip the work."""
        return self._live()

    def progress(self) -> None:
        """The remote answered for this call: it gets another ``timeout`` (if still live)."""
        with self._mutex:
            if self._live():
                self.deadline = time.monotonic() + self.timeout

    def finish(self, gid: int, tensors: Sequence[torch.Tensor | None] | None) -> bool:
        """Record group ``gid`` (``None``: it failed); False if the caller already gave up on it.

        A group that arrived is progress; a failed one is not, so a remote that fails
        every group within its timeout still ends the call one timeout after the
        last progress, not one timeout per group.
        """
        with self._mutex:
            if not self._live() or gid not in self._unfinished:
                return False
            if tensors is not None:
                for i, t in zip(self.groups[gid], tensors, strict=True):
                    self.results[i] = t
                self.deadline = time.monotonic() + self.timeout
            self._unfinished.discard(gid)
            if self._done():
                self._ring()
            return True

    def _done(self) -> bool:
        return not self._unfinished and self._next >= len(self.to_fetch)

    def _ring(self) -> None:
        """Under the lock: wake the caller's wait (a ring it has not taken yet stays)."""
        if self._bell.locked():
            self._bell.release()

    def close(self) -> None:
        """The caller gives up (interrupted): no group is handed out or recorded from now on."""
        with self._mutex:
            self._closed = True

    def wait(self) -> tuple[list[int], int]:
        """Block until every key is finished or the deadline, then close the call.

        Returns:
            The groups in flight at the deadline (timed out) and the number of keys
            never handed out (not tried: misses).
        """
        while True:
            with self._mutex:
                left = self._end() - time.monotonic()  # moves on with each progress
                if self._done() or self.aborted or left <= 0:
                    self._closed = True
                    return sorted(self._unfinished), len(self.to_fetch) - self._next
            # A ring since the state was read above returns at once.
            self._bell.acquire(True, min(left, threading.TIMEOUT_MAX))


class LMCPipelinedRemoteBackend(LMCRemoteBackend):
    """A remote backend whose ``batched_get`` fetches concurrently and decodes as parts arrive.

    LMCache's two-stage pipeline: fetch threads run ``network_worker()`` and
    decode threads run ``deserialize_worker()``, joined by queues. A
    ``batched_get`` splits its keys into groups and hands them to the fetch stage
    at most ``fetch_parallelism`` at a time; each group is one connector
    ``get_many`` (fsspec batch ``cat``, Redis MGET) whose bytes go straight on to
    the decode stage, so one group is decoded while the others are still in
    flight. A group has the connector's ``fetch_group_keys`` keys (Redis sends
    large values one per group), else at most ``FETCH_GROUP_BYTES`` of values
    and at most an even share of the batch; until a read has shown the value
    size, the first ``fetch_parallelism`` groups have one key each.
    Results are aligned with the keys, ``None`` for misses, corrupt objects or a
    dead remote. ``remote_timeout`` bounds the time without progress, not the
    whole batch: each group must arrive within it of the previous one, and a
    call whose remote stops answering returns one ``remote_timeout`` after the
    last group arrived, whatever the stages are doing (keys not yet sent are
    misses). Thread-safe: any number of callers may batch at once.

    Args:
        fetch_parallelism: concurrent ``get_many`` calls per batch (and its number of
            groups unless the connector sizes them).
        fetch_workers: fetch-stage threads (default ``2 * fetch_parallelism``, so
            two callers batch at once, and a call hung on a dead remote does not
            starve the next one).
        decode_workers: decode-stage threads (default ``fetch_parallelism``, at
            most the number of CPUs).
        **kwargs: as ``LMCRemoteBackend``.
    """

    def __init__(
        self,
        config: LMCacheEngineConfig,
        metadata: LMCacheEngineMetadata | None = None,
        dst_device: str = "cuda",
        *,
        fetch_parallelism: int = 4,
        fetch_workers: int | None = None,
        decode_workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        if fetch_parallelism < 1:
            raise ValueError(f"fetch_parallelism must be >= 1, got {fetch_parallelism}")
        if fetch_workers is not None and fetch_workers < 1:
            raise ValueError(f"fetch_workers must be >= 1, got {fetch_workers}")
        if decode_workers is not None and decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {decode_workers}")
        self.fetch_parallelism = fetch_parallelism
        self.fetch_workers = fetch_workers or 2 * fetch_parallelism
        self.decode_workers = decode_workers or max(1, min(fetch_parallelism, os.cpu_count() or 1))
        super().__init__(config, metadata, dst_device, **kwargs)

    def _start_runtime(self) -> None:
        super()._start_runtime()
        # Items: (call, group id) for the fetch stage; (call, group id, blobs) for decode.
        self._fetch_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._decode_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # The stages start with the first batched_get: a backend that only writes
        # (or only gets one key at a time) never holds their threads.
        self._stage_threads: list[threading.Thread] = []
        self._stage_claim = itertools.count()  # the first next() starts them
        # Calls in flight, for close() to end (weak: a finished call is gone).
        self._calls: weakref.WeakSet[_BatchCall] = weakref.WeakSet()

    def _start_stages(self) -> None:
        """Have the stage threads started (by a thread of their own, once); never waits:
        the call's groups wait in the fetch queue meanwhile.

        ``Thread.start`` waits for the new thread through a ``threading.Event``: a
        KeyboardInterrupt in that wait on the caller's thread could leave its lock held
        (the new thread then hung before running), and one between two starts left the
        stages half started and unrecorded (close() never ended them).
        """
        if self._stage_threads:
            return
        try:
            _thread.start_new_thread(self._start_stages_once, ())
        except RuntimeError:  # no new threads (interpreter exit): start them here
            self._start_stages_once()

    def _start_stages_once(self) -> None:
        if next(self._stage_claim) != 0:
            return
        with self._lock:
            if self._stage_threads or self._closed:
                return
            threads = [
                threading.Thread(target=self.network_worker, name=f"lmcache-remote-fetch-{i}", daemon=True)
                for i in range(self.fetch_workers)
            ] + [
                threading.Thread(target=self.deserialize_worker, name=f"lmcache-remote-decode-{i}", daemon=True)
                for i in range(self.decode_workers)
            ]
            self._stage_threads = threads  # seen started by all: the lock is held until they are
            for t in threads:
                t.start()

    def describe(self) -> str:
        return f"remote {self.display_url} (pipelined)"

    def _shut_down(self) -> None:
        """As ``LMCRemoteBackend``'s, then stop the fetch and decode stages (bounded)."""
        super()._shut_down()
        with self._lock:  # after this, _start_stages sees _closed and starts nothing
            threads = list(self._stage_threads)
        for t in threads:
            (self._fetch_queue if t.name.startswith("lmcache-remote-fetch") else self._decode_queue).put(
                RemoteBackendEndSignal()
            )
        # A fetch thread hung on a dead remote is a daemon: wait a little, never long.
        deadline = time.monotonic() + min(self.timeout, 2.0)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        # Groups fetched but left undecoded when the stages stopped would hold their
        # callers until remote_timeout (and count as the remote's timeouts): end them.
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.abort()

    # -- the two pipeline stages ---------------------------------------------------

    def network_worker(self) -> None:
        """The fetch stage's loop (LMCache's ``network_worker``), run by each fetch thread.

        Takes a group of keys of a ``batched_get`` from the fetch queue, fetches it
        with one connector ``get_many`` (retries, breaker, the call's deadline),
        hands the bytes to the decode stage and goes on with the call's next group
        not yet handed out. A group whose caller has given up is skipped; a failed
        fetch finishes the group as misses. Returns on
        ``RemoteBackendEndSignal`` (queued by ``close()``).
        """
        while True:
            item = self._fetch_queue.get()
            if isinstance(item, RemoteBackendEndSignal):
                return
            self._fetch_call(*item)
            del item  # idle with no batch alive (see _DaemonPool._run)

    def _fetch_call(self, call: _BatchCall, gid: int | None) -> None:
        call.mark_started()
        while gid is not None and call.wanted():  # else the caller counted this group already
            self._fetch_group(call, gid)
            gid = call.take_next()
            if gid is not None and self.breaker.state == OPEN:
                # The remote failed meanwhile: the call's other groups fail fast
                # (a read of the state, so a half-open probe is not used up).
                while gid is not None:
                    if call.finish(gid, None):
                        self.stats.incr("circuit_rejections")
                        self.stats.incr("misses", len(call.groups[gid]))
                    gid = call.take_next()

    @staticmethod
    def _batch_read_helper(call: _BatchCall) -> Any:
        """How a streaming group reads each chunk: alone when several groups read side by
        side, else split (16 hot 32 MiB chunks from a local directory: 57 ms with each
        chunk also split over the checksum helpers, six threads on two cores; 47-51 ms
        alone, about one raw ``readinto`` after another)."""
        return chunk_format.ALONE if call.window > 1 and len(call.to_fetch) > 1 else None

    def _group_size(self, call: _BatchCall) -> int:
        """Keys in the next group of ``call`` (see the class docstring)."""
        hint = self.connector.fetch_group_keys()
        if hint is not None:
            return max(1, hint)
        value_bytes = self.connector.learned_value_bytes()
        if value_bytes:
            return max(1, min(call.even_size, FETCH_GROUP_BYTES // value_bytes))
        if len(call.groups) < call.window:
            # Value size unknown: a group of 32 MiB chunks split evenly could take many
            # timeouts to arrive; single chunks show the size (or that they are absent).
            return 1
        return call.even_size

    def _fetch_group(self, call: _BatchCall, gid: int) -> None:
        keys = call.group_keys(gid)
        # A streaming connector's chunks arrive read and checked (see _read_streams).
        fetch: Callable[[Sequence[CacheEngineKey]], Sequence[Any]] = (
            functools.partial(self._read_streams, helper=self._batch_read_helper(call))
            if self.connector.streams
            else self.connector.get_many
        )
        try:
            # Each group's retries get one timeout of their own (the caller's deadline
            # moves on with the batch's progress, see _BatchCall).
            blobs = self._attempts(
                "get_many", fetch, (keys,), time.monotonic() + self.timeout, True, strikes=call.strikes
            )
            if len(blobs) != len(keys):  # a connector bug must not shift results between keys
                raise RuntimeError(f"get_many returned {len(blobs)} values for {len(keys)} keys")
        except Exception as exc:
            logger.debug("%s: batched get failed: %r", self.display_url, exc)
            if call.finish(gid, None):
                self.stats.incr("unavailable")
                self.stats.incr("misses", len(keys))
            return
        if self.connector.streams:  # read past the connector's get_many, which learns sizes itself
            self.connector.learn_value_sizes(blobs)
        call.progress()  # the remote answered: decoding is not held to the fetch's clock
        self._decode_queue.put((call, gid, blobs))

    def deserialize_worker(self) -> None:
        """The decode stage's loop (LMCache's ``deserialize_worker``), run by each decode thread.

        Takes a fetched group from the decode queue, decodes every object
        (checksum verified; missing or corrupt -> ``None``) onto ``dst_device`` and
        hands the tensors to the waiting caller. Returns on ``RemoteBackendEndSignal``.
        """
        while True:
            item = self._decode_queue.get()
            if isinstance(item, RemoteBackendEndSignal):
                return
            self._decode_group(*item)
            del item  # idle with no fetched bytes alive (see _DaemonPool._run)

    def _decode_group(self, call: _BatchCall, gid: int, blobs: Sequence[Any]) -> None:
        if not call.wanted():
            return
        keys = call.group_keys(gid)
        tensors: list[torch.Tensor | None]
        try:
            if self.connector.streams:  # already tensors, checked (see _read_streams)
                tensors = [None if b is None else self._to_dst(b, call.stream) for b in blobs]
            else:
                tensors = [self._decode_blob(k, b, stream=call.stream) for k, b in zip(keys, blobs, strict=True)]
        except Exception as exc:  # e.g. no room on dst_device: misses, and the stage lives on
            logger.error("%s: decoding a batch failed: %r", self.display_url, exc)
            tensors = [None] * len(keys)
        if call.finish(gid, tensors):
            hits = sum(t is not None for t in tensors)
            self.stats.incr("hits", hits)
            self.stats.incr("misses", len(keys) - hits)

    def _queue_fetch(self, call: _BatchCall, gid: int) -> None:
        self._fetch_queue.put((call, gid))

    def batched_get(self, keys: Iterable[CacheEngineKey]) -> list[torch.Tensor | None]:
        """Chunks aligned with ``keys``: ``None`` for misses, corrupt objects, or a dead remote."""
        keys = [check_key(k) for k in keys]
        self._check_open()
        self._check_fork()
        results: list[torch.Tensor | None] = [None] * len(keys)
        to_fetch: list[int] = []
        for i, key in enumerate(keys):
            pending = self._pending_copy(key)
            if pending is not None:
                self.stats.incr("hits")
                results[i] = self._to_dst(pending)
            elif self._stale_miss(key):
                self.stats.incr("misses")
            else:
                to_fetch.append(i)
        if not to_fetch:
            return results
        if not self.breaker.allow():
            self.stats.incr("circuit_rejections")
            self.stats.incr("misses", len(to_fetch))
            return results
        self._start_stages()
        call = _BatchCall(
            keys, to_fetch, self._group_size, self.timeout, self._queue_fetch, window=self.fetch_parallelism
        )
        call.stream = caller_stream(self._dst)  # the decode threads' GPU copies are for it
        with self._lock:
            # A close() that ran since _check_open stopped the stages and ended the calls
            # it knew: this one would wait START_WAIT_TIMEOUTS timeouts for no fetch thread.
            closing = self._closed
            if not closing:
                self._calls.add(call)
        if closing:
            self.stats.incr("misses", len(to_fetch))
            return results
        try:
            call.start()
            unfinished, not_sent = call.wait()
        except BaseException:
            call.close()  # interrupted: the stages drop the rest of the call
            raise
        if call.aborted:  # the backend closed under it: misses, not the remote's timeouts
            self.stats.incr("misses", sum(len(call.groups[gid]) for gid in unfinished) + not_sent)
            unfinished, not_sent = [], 0
        # The deadline (remote_timeout without progress): what is still out is a miss
        # and a timeout, one strike against the circuit; keys never sent are misses.
        # A call no fetch thread took up was queued behind others: misses, no strike.
        if unfinished:
            for gid in unfinished:
                self.stats.incr("timeouts" if call.started else "queue_timeouts")
                self.stats.incr("misses", len(call.groups[gid]))
            if call.started and call.strikes.first():
                self.breaker.record_failure("batched get: no answer in time")
        if not_sent:
            self.stats.incr("misses", not_sent)
        for i in to_fetch:
            results[i] = call.results[i]
        # The call is closed (no late finish writes to it); a stage thread may still
        # hold it, and must not keep the caller's chunks alive through it.
        call.results = []
        return results
