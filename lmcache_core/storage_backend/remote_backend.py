"""The remote tier: a connector (fsspec object store, Redis) plus the chunk format.

``LMCRemoteBackend`` adds to a connector, once for every transport: the chunk
format (checksummed safetensors; corrupt or foreign objects are misses), a hard
timeout on every remote call, retries with capped exponential backoff for
idempotent reads, a circuit breaker, a worker for non-blocking puts, and a
cached set of known keys. ``LMCPipelinedRemoteBackend`` also fetches a batch
concurrently and decodes each part as it arrives.

How a dead remote looks to the caller: ``get``/``contains`` are misses (counted
in ``stats``), a blocking ``put`` raises ``StoreUnavailableError``, a
non-blocking one is logged and counted; nothing waits longer than the timeout,
and the backend recovers by itself when the remote answers again.
"""

from __future__ import annotations

import builtins
import logging
import math
import os
import queue
import random
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

from lmcache_core import chunk_format
from lmcache_core.chunk_format import ChunkHeader
from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata, mask_url
from lmcache_core.errors import CorruptChunkError, LMCacheError, StoreFullError, StoreUnavailableError
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.abstract_backend import (
    BackendStats,
    ChunkInfo,
    LMCBackendInterface,
    check_chunk,
    check_key,
)
from lmcache_core.storage_backend.circuit import OPEN, CircuitBreaker
from lmcache_core.storage_backend.connector.base import RemoteConnector

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that prove the remote answered: it is up, so they never open the circuit.
_ANSWERS: tuple[type[BaseException], ...] = (StoreFullError, PermissionError)
# Headers are ~300 bytes: one ranged read of this much nearly always holds one.
HEADER_PROBE_BYTES = 4096

# fork safety: a lock taken by another thread at fork() time stays taken in the
# child forever, so the child gets a fresh one.
_fork_lock = threading.Lock()


def _reset_fork_lock() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_fork_lock)


class RemoteBackendEndSignal:
    """Queued to stop a put worker after everything queued before it is written."""


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff for idempotent remote reads.

    Attempt ``n`` (0-based) that fails waits ``min(max_delay, base_delay *
    multiplier**n)``, times ``1 ± jitter``, before the next one. All attempts
    of one call share that call's timeout: a retry is made only while time is left.

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


class _DaemonPool:
    """A fixed set of daemon threads running submitted callables into Futures.

    ``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter
    exit, so one call hung on a dead server would keep the process from exiting;
    these threads are daemons, and a task that starts after its deadline is
    dropped instead of run. Thread-safe.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, fn, args, deadline))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, deadline = item
            if not future.set_running_or_notify_cancel():
                continue
            if deadline is not None and time.monotonic() >= deadline:
                future.set_exception(TimeoutError("deadline passed while queued"))
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Stop the threads once idle; never waits (a hung thread is a daemon)."""
        for _ in self._threads:
            self._queue.put(None)


class LMCRemoteBackend(LMCBackendInterface):
    """KV chunks in a remote store named by ``config.remote_url``.

    Args:
        config: ``remote_url`` picks the connector (``s3://``, ``redis://``, ...);
            ``remote_timeout`` bounds every remote call.
        metadata: engine metadata (unused by the remote tier; kept for LMCache's signature).
        dst_device: where ``get`` puts tensors.
        connector: a ready connector instead of one built from the URL (tests).
        retry: backoff for idempotent reads.
        breaker: circuit breaker; default opens after 5 consecutive failures for 5 s.
        put_workers: background writer threads for ``blocking=False`` puts.
        list_timeout: seconds a ``list()`` may take (default 10 x ``remote_timeout``).
        close_timeout: upper bound on ``close()`` draining queued writes
            (default: enough for the breaker to open and the rest to fail fast).
        **connector_options: passed to the connector (e.g. S3 ``endpoint_url``).

    The tensor ``get`` returns on CPU aliases the fetched bytes (no copy).
    ``contains`` answers from a set of keys this process has seen stored,
    asking the remote only for unknown keys; a ``get`` miss removes the key.

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
        **connector_options: Any,
    ) -> None:
        super().__init__(dst_device)
        if not config.remote_url and connector is None:
            raise ValueError("remote_url: not set; a remote backend needs e.g. s3://bucket/prefix or redis://host")
        if put_workers < 1:
            raise ValueError(f"put_workers must be >= 1, got {put_workers}")
        self.config = config
        self.metadata = metadata
        self.timeout = float(config.remote_timeout)
        self.retry = retry or RetryPolicy()
        self._connector_options = connector_options
        self._injected = connector is not None
        self.connector: RemoteConnector = connector or self._open_connector()
        self.display_url = self.connector.display_url or mask_url(config.remote_url or "")
        self.breaker = breaker or CircuitBreaker(name=self.display_url)
        self.list_timeout = list_timeout if list_timeout is not None else 10 * self.timeout
        self.close_timeout = (
            close_timeout
            if close_timeout is not None
            else self.timeout * (self.breaker.failure_threshold + 2)
        )
        self._put_worker_count = put_workers
        self._closed = False
        self._start_runtime()

    # -- lifecycle -----------------------------------------------------------------

    def _open_connector(self) -> RemoteConnector:
        from lmcache_core.storage_backend.connector.registry import connector_for

        assert self.config.remote_url is not None
        return connector_for(self.config.remote_url, timeout=self.timeout, **self._connector_options)

    def _start_runtime(self) -> None:
        """Locks, thread pools and queues: everything a forked child must rebuild."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._known: set[CacheEngineKey] = set()
        self._pending: dict[CacheEngineKey, torch.Tensor] = {}
        self._writing: dict[CacheEngineKey, threading.Event] = {}
        self._io = _DaemonPool(self._io_threads(), "lmcache-remote-io")
        # One queue per writer; a key always goes to the same writer, so two
        # queued writes of one key land in the order they were made.
        self._put_queues: list[queue.Queue[Any]] = [queue.Queue() for _ in range(self._put_worker_count)]
        self._put_threads = [
            threading.Thread(target=self.put_worker, args=(q,), name=f"lmcache-remote-put-{i}", daemon=True)
            for i, q in enumerate(self._put_queues)
        ]
        for t in self._put_threads:
            t.start()

    def _io_threads(self) -> int:
        return 16

    def _check_fork(self) -> None:
        if self._pid == os.getpid():
            return
        with _fork_lock:
            if self._pid == os.getpid():
                return
            logger.info("%s: forked process %d reopens its remote connection", self.display_url, os.getpid())
            if not self._injected:
                self.connector = self._open_connector()
            # Locks held by other parent threads at fork() stay held in the child: rebuild them.
            self.breaker.after_fork()
            self.stats = BackendStats()
            self._start_runtime()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.describe()}: backend is closed")

    def describe(self) -> str:
        return f"remote {self.display_url}"

    def close(self) -> None:
        """Drain queued writes (bounded by ``close_timeout``), then release the connection.

        Bounded even when the remote is dead: each write has its timeout and the
        circuit breaker makes the rest fail fast. Writes still queued at the
        bound are dropped, logged and counted (``dropped_on_close``). Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # a child never started these workers; nothing of its own to drain
        deadline = time.monotonic() + self.close_timeout
        for q in self._put_queues:
            q.put(RemoteBackendEndSignal())
        for t in self._put_threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._put_threads):
            with self._lock:
                dropped = len(self._pending)
                self._pending.clear()
            self.stats.incr("dropped_on_close", dropped)
            logger.error(
                "%s: close() gave up after %.1fs with %d queued writes not stored",
                self.display_url,
                self.close_timeout,
                dropped,
            )
        self._io.shutdown()
        # Closing a client may itself touch the network; never wait long for it.
        closer = threading.Thread(target=self._close_connector, name="lmcache-remote-close", daemon=True)
        closer.start()
        closer.join(timeout=min(self.timeout, 2.0))

    def _close_connector(self) -> None:
        try:
            self.connector.close()
        except Exception:
            logger.debug("%s: closing the connector failed", self.display_url, exc_info=True)

    # -- the one way every remote call is made -------------------------------------

    def _attempts(self, what: str, fn: Callable[..., T], args: tuple[Any, ...], deadline: float, retry: bool) -> T:
        """Run ``fn`` with retries (if ``retry``) until it succeeds or time runs out.

        Runs on an I/O thread; the caller waits with the same deadline. Every
        outcome is reported to the circuit breaker.
        """
        attempts = self.retry.attempts if retry else 1
        for attempt in range(attempts):
            if attempt > 0 and not self.breaker.allow():
                raise StoreUnavailableError(self.display_url, f"{what}: circuit open")
            try:
                result = fn(*args)
            except _ANSWERS as exc:
                # The remote is up and said no (full, access denied): not an
                # outage, so neither a retry nor a strike against the circuit.
                self.breaker.record_success()
                logger.debug("%s: %s refused: %r", self.display_url, what, exc)
                raise
            except Exception as exc:
                self.breaker.record_failure()
                self.stats.incr("remote_errors")
                pause = self.retry.delay(attempt)
                last = attempt == attempts - 1 or time.monotonic() + pause >= deadline
                logger.debug("%s: %s failed (attempt %d): %r", self.display_url, what, attempt + 1, exc)
                if last or self.breaker.state == OPEN:
                    raise
                self.stats.incr("retries")
                time.sleep(pause)
                continue
            self.breaker.record_success()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _submit(
        self, what: str, fn: Callable[..., T], *args: Any, retry: bool, timeout: float | None = None
    ) -> tuple[Future[T], float]:
        """Start a remote call on an I/O thread; fail fast while the circuit is open."""
        self._check_fork()
        if not self.breaker.allow():
            self.stats.incr("circuit_rejections")
            raise StoreUnavailableError(
                self.display_url, f"{what}: circuit open (retry in {self.breaker.retry_after():.1f}s)"
            )
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        return self._io.submit(self._attempts, what, fn, args, deadline, retry, deadline=deadline), deadline

    def _await(self, what: str, future: Future[T], deadline: float) -> T:
        """The call's result, or ``StoreUnavailableError`` at the deadline (the call may hang on)."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            future.cancel()
            self.breaker.record_failure()
            self.stats.incr("timeouts")
            raise StoreUnavailableError(self.display_url, f"{what}: no answer within the timeout") from None
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
        """Store a chunk; ``blocking=False`` queues it for a background writer.

        Raises:
            StoreUnavailableError: (blocking) the remote did not take the chunk.
        """
        check_key(key)
        check_chunk(kv_chunk)
        self._check_open()
        self._check_fork()
        if blocking:
            self.put_blocking(key, kv_chunk)
        else:
            self.put_nonblocking(key, kv_chunk)

    def put_blocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        self._supersede(key)
        self._write(key, kv_chunk)

    def put_nonblocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """Queue the write; the caller must not modify ``kv_chunk`` until it is stored."""
        with self._lock:
            self._pending[key] = kv_chunk
        self._put_queues[zlib.crc32(key.chunk_hash.encode()) % len(self._put_queues)].put((key, kv_chunk))

    def put_worker(self, work: queue.Queue[Any] | None = None) -> None:  # type: ignore[override]
        """Body of a background writer: store queued chunks in order until the end signal."""
        assert work is not None
        while True:
            item = work.get()
            if isinstance(item, RemoteBackendEndSignal):
                return
            key: CacheEngineKey = item[0]
            chunk: torch.Tensor = item[1]
            with self._lock:
                if self._pending.get(key) is not chunk:
                    continue  # removed or superseded while queued
                done = self._writing[key] = threading.Event()
            try:
                self._write(key, chunk)
            except Exception as exc:
                self.stats.incr("background_put_failures")
                logger.error("%s: background put of %s failed: %s", self.display_url, key, exc)
            finally:
                with self._lock:
                    if self._pending.get(key) is chunk:
                        del self._pending[key]
                    self._writing.pop(key, None)
                done.set()

    def _write(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        header, payload = chunk_format.encode(kv_chunk, key.to_string())
        try:
            self._call("put", self.connector.put, key, (header, payload), retry=False)
        except Exception:
            self.stats.incr("put_failures")
            with self._lock:
                self._known.discard(key)
            raise
        with self._lock:
            self._known.add(key)
        self.stats.incr("puts")

    def _supersede(self, key: CacheEngineKey) -> bool:
        """Drop a queued write of ``key`` and wait for one in flight; True if one was queued."""
        with self._lock:
            was_pending = self._pending.pop(key, None) is not None
            writing = self._writing.get(key)
        if writing is not None:
            writing.wait(timeout=self.timeout * 2)
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

    def _get(self, key: CacheEngineKey) -> torch.Tensor | None:
        pending = self._pending_copy(key)
        if pending is not None:
            self.stats.incr("hits")
            return self._to_dst(pending)
        blob = self._call("get", self.connector.get, key, retry=True)
        return self.deserialize(key, blob)

    def batched_get(self, keys: Iterable[CacheEngineKey]) -> list[torch.Tensor | None]:
        """One ``get`` after another; once the remote fails, the rest are misses at once.

        So a batch against a dead remote costs one timeout, not one per key.
        """
        keys = [check_key(k) for k in keys]
        self._check_fork()
        self._check_open()
        results: list[torch.Tensor | None] = []
        for i, key in enumerate(keys):
            try:
                results.append(self._get(key))
            except StoreUnavailableError as exc:
                logger.debug("%s", exc)
                rest = len(keys) - i
                self.stats.incr("unavailable")
                self.stats.incr("misses", rest)
                results.extend([None] * rest)
                break
        return results

    def deserialize(self, key: CacheEngineKey, blob: bytes | None) -> torch.Tensor | None:
        """Fetched bytes -> tensor on ``dst_device`` (zero-copy on CPU); misses are ``None``."""
        if blob is None:
            with self._lock:
                self._known.discard(key)
            self.stats.incr("misses")
            return None
        try:
            tensor = chunk_format.decode(blob, key.to_string())
        except CorruptChunkError as exc:
            with self._lock:
                self._known.discard(key)
            self.stats.incr("corrupt")
            self.stats.incr("misses")
            logger.warning("%s: object for %s is not a valid chunk, treated as a miss: %s", self.display_url, key, exc)
            return None
        self.stats.incr("hits")
        return self._to_dst(tensor)

    def contains(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is stored: known keys answer at once, others ask the remote."""
        check_key(key)
        self._check_fork()
        self._check_open()
        with self._lock:
            if key in self._pending or key in self._known:
                return True
        try:
            found = bool(self._call("exists", self.connector.exists, key, retry=True))
        except StoreUnavailableError as exc:
            logger.debug("%s", exc)
            self.stats.incr("unavailable")
            return False
        if found:
            with self._lock:
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
        was_pending = self._supersede(key)
        with self._lock:
            self._known.discard(key)
        removed = bool(self._call("delete", self.connector.delete, key, retry=False))
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
            self._known = set(seen)
        return infos + [ChunkInfo(k) for k in pending]

    def list(self) -> builtins.list[CacheEngineKey]:
        """Every stored key (and queued ones); also refreshes the cached set of known keys."""
        return [info.key for info in self.list_info()]

    def read_header(self, key: CacheEngineKey) -> ChunkHeader | None:
        """The chunk's header from a ranged read of its first bytes (payload not fetched)."""
        check_key(key)
        self._check_fork()
        self._check_open()
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None:
            return chunk_format.parse_header(chunk_format.encode_header(pending.detach().cpu(), key.to_string()))
        try:
            head = self._call("get_range", self.connector.get_range, key, 0, HEADER_PROBE_BYTES, retry=True)
            if head is None:
                return None
            need = chunk_format.header_length(head)
            if len(head) < need:
                head = self._call("get_range", self.connector.get_range, key, 0, need, retry=True)
                if head is None:
                    return None
            header = chunk_format.parse_header(head)
            chunk_format.check_identity(header, key.to_string())
            return header
        except (StoreUnavailableError, CorruptChunkError) as exc:
            logger.debug("%s: no header for %s: %s", self.display_url, key, exc)
            return None


class LMCPipelinedRemoteBackend(LMCRemoteBackend):
    """A remote backend whose ``batched_get`` fetches concurrently and decodes as parts arrive.

    The keys are split into up to ``fetch_parallelism`` groups; each group is one
    connector ``get_many`` (fsspec batch ``cat``, Redis MGET/pipeline) on its own
    I/O thread (``network_worker``), and the caller decodes each group as soon
    as it lands (``deserialize_worker``) while the others are still in flight.
    Results are aligned with the keys, ``None`` for misses. Thread-safe: any
    number of callers may batch at once.
    """

    def __init__(
        self,
        config: LMCacheEngineConfig,
        metadata: LMCacheEngineMetadata | None = None,
        dst_device: str = "cuda",
        *,
        fetch_parallelism: int = 4,
        **kwargs: Any,
    ) -> None:
        if fetch_parallelism < 1:
            raise ValueError(f"fetch_parallelism must be >= 1, got {fetch_parallelism}")
        self.fetch_parallelism = fetch_parallelism
        super().__init__(config, metadata, dst_device, **kwargs)

    def _io_threads(self) -> int:
        return max(16, 4 * self.fetch_parallelism)

    def describe(self) -> str:
        return f"remote {self.display_url} (pipelined)"

    def network_worker(self, keys: Sequence[CacheEngineKey], deadline: float) -> list[bytes | None]:
        """Fetch one group of keys in one batched connector call (runs on an I/O thread)."""
        blobs = self._attempts("get_many", self.connector.get_many, (list(keys),), deadline, True)
        if len(blobs) != len(keys):  # a connector bug must not shift results between keys
            raise RuntimeError(f"get_many returned {len(blobs)} values for {len(keys)} keys")
        return blobs

    def deserialize_worker(
        self, keys: Sequence[CacheEngineKey], blobs: Sequence[bytes | None]
    ) -> list[torch.Tensor | None]:
        """Decode one fetched group (checksums verified, corrupt -> ``None``)."""
        return [self.deserialize(k, b) for k, b in zip(keys, blobs, strict=True)]

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
            else:
                to_fetch.append(i)
        if not to_fetch:
            return results
        size = math.ceil(len(to_fetch) / self.fetch_parallelism)
        groups = [to_fetch[j : j + size] for j in range(0, len(to_fetch), size)]
        if not self.breaker.allow():
            self.stats.incr("circuit_rejections")
            self.stats.incr("misses", len(to_fetch))
            return results
        deadline = time.monotonic() + self.timeout
        inflight: dict[Future[list[bytes | None]], list[int]] = {
            self._io.submit(self.network_worker, [keys[i] for i in g], deadline, deadline=deadline): g
            for g in groups
        }
        while inflight:
            done, _ = wait(inflight, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            if not done:  # deadline: whatever is still out is a miss
                for future, group in inflight.items():
                    future.cancel()
                    self.stats.incr("timeouts")
                    self.stats.incr("misses", len(group))
                self.breaker.record_failure()
                break
            for future in done:
                group = inflight.pop(future)
                try:
                    blobs = future.result()
                except Exception as exc:
                    logger.debug("%s: batched get failed: %r", self.display_url, exc)
                    self.stats.incr("unavailable")
                    self.stats.incr("misses", len(group))
                    continue
                # Decode this group here while the other groups are still being fetched.
                for i, tensor in zip(group, self.deserialize_worker([keys[i] for i in group], blobs), strict=True):
                    results[i] = tensor
        return results
