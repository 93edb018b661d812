"""Local tiers: CPU/GPU memory (``LMCLocalBackend``) and a disk directory
(``LMCLocalDiskBackend``), with the seed's names and signatures.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import itertools
import logging
import math
import os
import queue
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Iterable

import torch

from lmcache_core import chunk_format, layout
from lmcache_core.chunk_format import ChunkHeader
from lmcache_core.config import (
    GB,
    UNLIMITED_GB,
    LMCacheEngineConfig,
    LMCacheEngineMetadata,
    LMCacheMemPoolMetadata,
)
from lmcache_core.errors import CorruptChunkError, StoreFullError
from lmcache_core.key import CacheEngineKey
from lmcache_core.layout import scan_store
from lmcache_core.storage_backend import disk_io
from lmcache_core.storage_backend.abstract_backend import (
    ChunkInfo,
    LMCBackendInterface,
    check_chunk,
    check_key,
)
from lmcache_core.storage_backend.devices import caller_stream, finished, for_library_threads, resolve_device
from lmcache_core.storage_backend.evictor import LRUIndex
from lmcache_core.storage_backend.mem_pool import BufferPool, fixed_chunk_shape, read_pool_bytes
from lmcache_core.storage_backend.write_queue import (
    MAX_QUEUED_BYTES,
    QueuedBytes,
    drain_at_exit,
    forget_at_exit,
)

logger = logging.getLogger(__name__)



class LocalBackendEndSignal:
    """Queued to stop a put worker after everything before it is written."""


class LMCLocalBackend(LMCBackendInterface):
    """KV chunks in CPU or GPU memory, LRU under ``max_local_cache_size`` GB.

    When ``metadata`` fixes the chunk shape, the budget's worth of slots is
    allocated and touched at construction, so a put is one copy into warm memory.
    ``get`` is zero-copy when ``dst_device`` is the storage device: the returned
    tensor shares memory with the cache and must not be modified. A slot is
    reused only after every tensor returned from it is released. On a GPU that
    release is a Python one: work queued on another CUDA stream that still reads
    the tensor must be synchronised before the last reference is dropped, as a
    later put copies into the slot on the put worker's stream. A put may come from
    any stream: the copy waits for the caller's work queued so far (a queued one
    on the worker's stream, ordered after the caller's), and a slot is published
    only once its copy has run (``devices.for_library_threads``, ``finished``).

    The last submitted put of a key wins: a blocking put supersedes a
    non-blocking put of the key still queued.

    Thread-safe; not process-safe (memory is per process). Fork-safe: a forked
    child gets its own copy of the cache, and on first use its own lock and put
    worker, which also stores the writes that were still queued at fork().
    """

    def __init__(
        self,
        config: LMCacheEngineConfig,
        metadata: LMCacheMemPoolMetadata | LMCacheEngineMetadata | None = None,
        dst_device: str = "cuda",
    ) -> None:
        super().__init__(dst_device)
        self.config = config
        self.device = config.local_memory_device or "cpu"
        # A bare "cuda" is pinned to this thread's GPU, as dst_device is: the put
        # worker thread would otherwise allocate on GPU 0.
        storage = resolve_device(self.device, "local_device")
        self._index: LRUIndex[CacheEngineKey] = LRUIndex(config.memory_budget_bytes, CacheEngineKey.as_tuple)
        self._chunks: dict[CacheEngineKey, torch.Tensor] = {}
        self._pending: dict[CacheEngineKey, torch.Tensor] = {}
        self._lock = threading.Lock()
        pin = storage.type == "cpu" and self._dst.type == "cuda"
        self._pool = BufferPool(storage, max_bytes=config.memory_budget_bytes, pin_memory=pin)
        fixed = fixed_chunk_shape(metadata)
        if fixed is not None:
            slot = math.prod(fixed[0]) * fixed[1].itemsize
            if slot > 0:
                self._pool.reserve(config.memory_budget_bytes // slot, slot)
        # A SimpleQueue: its put is one C call, so an interrupt landing in a caller's
        # put leaves the item queued or not, never a queue.Queue's mutex held.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._worker = self._start_worker()

    def _start_worker(self) -> threading.Thread:
        worker = threading.Thread(target=self.put_worker, name="lmcache-mem-put", daemon=True)
        worker.start()
        return worker

    def _after_fork(self) -> None:
        # The parent's worker thread does not exist here, and a lock a parent thread
        # held at fork() would stay held forever: fresh ones for this process.
        self._lock = threading.Lock()
        self._pool.after_fork()
        self._queue = queue.SimpleQueue()
        # Writes acknowledged before fork() are in this copy of _pending: queue them
        # again, so this copy of the cache ends up as the parent's does.
        for key, chunk in self._pending.items():
            self._queue.put((key, chunk))
        if not self._closed:
            self._worker = self._start_worker()

    def describe(self) -> str:
        return f"memory ({self.device})"

    # -- writes --------------------------------------------------------------------

    def put(self, key: CacheEngineKey, kv_chunk: torch.Tensor, blocking: bool = True) -> None:
        if blocking:
            self.put_blocking(key, kv_chunk)
        else:
            self.put_nonblocking(key, kv_chunk)

    def _check_put(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """What every put checks first (each of the seed's put methods is public)."""
        check_key(key)
        check_chunk(kv_chunk)
        self._index.check_fits(kv_chunk.numel() * kv_chunk.element_size())
        if self._closed:
            raise RuntimeError("backend is closed")
        self._check_fork()

    def put_blocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """Store now; a non-blocking put of ``key`` still queued is discarded. Thread-safe."""
        self._check_put(key, kv_chunk)
        if kv_chunk.requires_grad:  # the bytes only: a copy_ would tie the slot into the caller's graph
            kv_chunk = kv_chunk.detach()
        with self._lock:
            # What is queued now was submitted before this put: it must never land after it.
            superseded = self._pending.get(key)
        self._store(key, kv_chunk, only_if_pending=False, supersedes=superseded)

    def put_nonblocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """Queue the write; the caller must not modify ``kv_chunk`` until it is stored. Thread-safe."""
        self._check_put(key, kv_chunk)
        if kv_chunk.requires_grad:  # the bytes only: not the caller's autograd graph
            kv_chunk = kv_chunk.detach()
        for_library_threads(kv_chunk)  # the worker copies it on its own stream
        with self._lock:
            # Checked under the lock close() sets it under: a put that raced close()
            # either lands before the end signal (and is drained) or raises.
            if self._closed:
                raise RuntimeError("backend is closed")
            # Nothing an interrupt can land in between these two: the key's
            # __hash__/__eq__ run before the dict changes, the queue's put is one C call.
            self._pending[key] = kv_chunk
            self._queue.put((key, kv_chunk))

    def put_worker(self) -> None:
        """Body of the background writer thread: store queued chunks in order."""
        while True:
            item = self._queue.get()
            if isinstance(item, LocalBackendEndSignal):
                return
            key, chunk = item
            try:
                self._store(key, chunk, only_if_pending=True)
            except Exception:
                self.stats.incr("put_failures")
                logger.exception("background put of %s failed", key)
                with self._lock:
                    if self._pending.get(key) is chunk:
                        del self._pending[key]

    def _store(
        self,
        key: CacheEngineKey,
        kv_chunk: torch.Tensor,
        *,
        only_if_pending: bool,
        supersedes: torch.Tensor | None = None,
    ) -> None:
        """Copy ``kv_chunk`` in as ``key``.

        ``only_if_pending``: a queued write, dropped unless still the newest put of the
        key. ``supersedes``: the queued write a blocking put found when submitted; it
        is dequeued here (not a newer one queued while this put ran).
        """
        nbytes = kv_chunk.numel() * kv_chunk.element_size()
        with self._lock:
            if only_if_pending and self._pending.get(key) is not kv_chunk:
                return  # removed (or replaced) while queued: make no room for it either
            try:
                self._evict(self._index.victims_for(nbytes, exclude=key))
            except BaseException:
                self._resync_locked()
                raise
        buf = self._pool.acquire(nbytes)
        stored = buf.view(kv_chunk.dtype).view(kv_chunk.shape) if nbytes else torch.empty(
            kv_chunk.shape, dtype=kv_chunk.dtype, device=self._pool.device
        )
        # A copy into GPU memory returns before it has run: other threads (the
        # hybrid's writers, a get on another stream) may read the slot once published.
        finished(stored.copy_(kv_chunk))
        with self._lock:
            if only_if_pending and self._pending.get(key) is not kv_chunk:
                return  # removed (or replaced) while queued
            try:
                self._chunks[key] = stored
                self._index.add(key, nbytes)
                # Concurrent writers may have filled the budget meanwhile.
                self._evict(self._index.victims_over_budget(keep=key))
            except BaseException:
                self._resync_locked()
                raise
            # Only once stored: a put interrupted before that leaves the queued write
            # it supersedes to land, not the key older still.
            if only_if_pending or (supersedes is not None and self._pending.get(key) is supersedes):
                del self._pending[key]
        self.stats.incr("puts")

    def _evict(self, victims: list[CacheEngineKey]) -> None:
        for victim in victims:
            self._index.pop(victim)
            self._release(self._chunks.pop(victim, None))
            self.stats.incr("evictions")

    def _resync_locked(self) -> None:
        """Bring ``_chunks`` and ``_index`` back in step (under ``_lock``), after an exception.

        A put, eviction or removal changes one and then the other: an interrupt
        landing between them left a chunk the index did not count (held forever) or
        an index entry with no chunk (evicting it did nothing), or an overwrite counted
        at its old size. An unindexed chunk is dropped, an entry without a chunk
        forgotten, a size put right. O(chunks), on that path only.
        """
        for key in [k for k in self._chunks if k not in self._index]:
            self._release(self._chunks.pop(key))
        for key in [k for k in self._index if k not in self._chunks]:
            self._index.pop(key)
        for key, chunk in self._chunks.items():
            nbytes = chunk.numel() * chunk.element_size()
            if self._index.size_of(key) != nbytes:
                self._index.add(key, nbytes, recent=False)

    def _release(self, chunk: torch.Tensor | None) -> None:
        # Tell the pool where a free slot probably is, so the next put finds it in O(1).
        if chunk is not None and chunk.device == self._pool.device:
            self._pool.release(chunk)

    # -- reads ---------------------------------------------------------------------

    def get(self, key: CacheEngineKey) -> torch.Tensor | None:
        check_key(key)
        self._check_fork()
        with self._lock:
            # A queued put is newer than what is stored (read-your-writes of an overwrite).
            pending = self._pending.get(key)
            chunk = self._chunks.get(key) if pending is None else None
            if chunk is not None:
                self._index.touch(key)
        if pending is not None:
            chunk = pending.clone()  # the caller's tensor: a copy, outside the lock
        if chunk is None:
            self.stats.incr("misses")
            return None
        self.stats.incr("hits")
        # A tensor object of its own over the same memory (~1 us), not the stored one: an
        # in-place change of shape or autograd state by the caller (``unsqueeze_``,
        # ``requires_grad_``) changed what every later get returned.
        return self._to_dst(chunk if pending is not None else chunk.detach())

    def contains(self, key: CacheEngineKey) -> bool:
        check_key(key)
        self._check_fork()
        with self._lock:
            return key in self._chunks or key in self._pending

    def touch(self, key: CacheEngineKey) -> None:
        check_key(key)
        self._check_fork()
        with self._lock:
            self._index.touch(key)

    def remove(self, key: CacheEngineKey) -> bool:
        check_key(key)
        self._check_fork()
        with self._lock:
            was_pending = self._pending.pop(key, None) is not None
            try:
                present = self._index.pop(key) is not None
                self._release(self._chunks.pop(key, None))
            except BaseException:
                self._resync_locked()
                raise
        return present or was_pending

    def list(self) -> list[CacheEngineKey]:
        self._check_fork()
        with self._lock:
            return list(self._index) + [k for k in self._pending if k not in self._chunks]

    def list_info(self) -> builtins.list[ChunkInfo]:
        self._check_fork()
        with self._lock:
            # The keys list() gives: queued puts of new keys too.
            infos = [ChunkInfo(k, self._index.size_of(k)) for k in self._index]
            infos += [
                ChunkInfo(k, c.numel() * c.element_size())
                for k, c in self._pending.items()
                if k not in self._chunks
            ]
            return infos

    def peek(self, key: CacheEngineKey) -> torch.Tensor | None:
        """The tier's own stored tensor of ``key`` on its storage device, or ``None``.

        Not moved to ``dst_device`` and not counted as a hit. Stored tensors are never
        written again (a put copies into a fresh slot), so the result is a private,
        immutable copy of the chunk for as long as it is held; it must not be
        modified. Thread-safe.
        """
        check_key(key)
        self._check_fork()
        with self._lock:
            return self._chunks.get(key)

    def read_header(self, key: CacheEngineKey) -> ChunkHeader | None:
        self._check_fork()
        with self._lock:
            # As get: a queued put is newer than what is stored.
            chunk = self._pending.get(key)
            if chunk is None:
                chunk = self._chunks.get(key)
        if chunk is None:
            return None
        cpu = chunk.detach().cpu().contiguous()
        return chunk_format.parse_header(chunk_format.encode_header(cpu, key.to_string()))

    @property
    def used_bytes(self) -> int:
        self._check_fork()
        with self._lock:
            return self._index.used

    def close(self) -> None:
        """Store every queued chunk, then stop the put worker. Idempotent."""
        if self._closed and not self._worker.is_alive():
            return
        self._check_fork()  # in a child: its own worker, which close must drain
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(LocalBackendEndSignal())  # after every put queued before it
        # Every close waits, not only the first: one interrupted in its join must not
        # leave a later close returning with writes still queued.
        if self._worker is not threading.current_thread():
            self._worker.join()


# -- disk ------------------------------------------------------------------------------


def _write_temp(tmp: str, kv_chunk: torch.Tensor, key: str, fsync: bool, *, make_dir: bool = False) -> int:
    """Write ``kv_chunk`` to the fresh temp file ``tmp`` (``layout.temp_path``): the bytes
    written. ``make_dir``: make the directory (``disk_io.open_write``).

    Raises:
        OSError: the write failed; the temp file is removed.
    """
    try:
        with disk_io.open_write(tmp, make_dir=make_dir) as f:
            n = chunk_format.write_chunk(f, kv_chunk, key)
            if fsync:
                disk_io.fsync(f, tmp)
    except BaseException:
        _discard_temp(tmp)
        raise
    return n


def _mark_read(fd: int, st: os.stat_result) -> None:
    """Set the open file's access time to now, keeping its modification time (best effort)."""
    try:
        os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
    except OSError:
        pass  # a read-only mount, or the file went: the order is only a hint


def _is_file(path: str) -> bool:
    """Whether a regular file is at ``path`` (what a get can serve: not a FIFO or directory)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _discard_temp(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _remove_if_same(path: str, st: os.stat_result | None) -> None:
    """Remove the file at ``path`` if it is the one ``st`` describes (any, when None).

    The key lock keeps this process's puts out, not another process's: one that renamed
    a good chunk over the bad one after our check would lose it to a plain unlink. So
    the file is first renamed aside, which takes exactly one file, and put back under
    its name (unless an even newer one is there) when it is not the one that was read.

    Raises:
        OSError: the rename failed (``FileNotFoundError``: nothing there any more).
    """
    aside = layout.temp_path(path)  # a temp name: a kill right here leaves what start-up removes
    disk_io.rename_away(path, aside)
    try:
        moved = os.stat(aside)
        if st is None or (moved.st_ino, moved.st_dev) == (st.st_ino, st.st_dev):
            return
        try:
            os.link(aside, path)  # fails on a newer chunk at the path, which wins
        except FileExistsError:
            pass
        except OSError:  # no hard links here (some FUSE, SMB mounts): a rename, not over a file
            if not os.path.lexists(path):
                os.rename(aside, path)
    finally:
        _discard_temp(aside)


def _key_from_path(path: str) -> str:
    """The key a store's layout gives ``path`` (``key_to_path``), or "" when none or ambiguous.

    The store root is unknown, so every tail of the path long enough to be a chunk
    path is tried; the layout makes at most one of them canonical.
    """
    parts = os.path.abspath(path).split(os.sep)
    found: set[str] = set()
    for n in range(5, min(len(parts), 40) + 1):
        try:
            found.add(layout.path_to_key("/".join(parts[-n:])).to_string())
        except ValueError:
            continue
    return found.pop() if len(found) == 1 else ""


def save_disk(path: str, kv_chunk: torch.Tensor, key: str | None = None, fsync: bool = False) -> int:
    """Atomically write ``kv_chunk`` in the chunk format at ``path``.

    Writes a temp file in the same directory, then ``os.replace``: readers see
    the old file or the whole new one, never a torn one. Returns bytes written.
    Without ``key`` (the seed's ``save_disk(path, kv_chunk)``), the header names
    the key whose layout path ``path`` is, or none when it is not a chunk path.

    Raises:
        OSError: the write failed; no partial file is left behind.
    """
    check_chunk(kv_chunk)
    tmp = layout.temp_path(path)
    try:
        n = _write_temp(tmp, kv_chunk, key if key is not None else _key_from_path(path), fsync)
        disk_io.replace(tmp, path)
    except BaseException:
        _discard_temp(tmp)
        raise
    return n


def chunk_file_size(kv_chunk: torch.Tensor, key: str) -> int:
    """Bytes ``kv_chunk`` takes as a chunk file under ``key``: header + payload.

    Exact, without reading the payload (``chunk_format.stored_size``).
    """
    return chunk_format.stored_size(kv_chunk, key)


_KEY_LOCKS = 64
#: A get sets its file's access time when it is older than this: on noatime (or
#: relatime) mounts reads left it unchanged, so the LRU order that a restart and the
#: tools (``evict --to-size``, ``--older-than``) rebuild from it ignored what was served.
ATIME_REFRESH_S = 60.0
#: A put waiting for room in the write queue gives up when no queued write finished
#: for this long (disk writes have no timeout of their own).
QUEUE_STALL_S = 60.0
#: A write that fails for a full disk (or quota) is tried again at most this many times,
#: each after unlinking the tier's least recently used chunks, a chunk's worth.
FULL_DISK_RETRIES = 2
#: A full disk sweeps the store for dead writers' temp files at most this often.
FULL_DISK_SWEEP_S = 60.0
#: After a put that letting go of chunks did not save (the disk stays full: filled by
#: others, snapshots keep the blocks, a quota charged to other files), no chunk is let go
#: for a full disk for this long, doubling while it lasts up to ``FULL_DISK_BACKOFF_MAX_S``:
#: each failed put took two chunks with it, and a few hundred puts emptied the tier.
FULL_DISK_BACKOFF_S = 60.0
FULL_DISK_BACKOFF_MAX_S = 3600.0


def _discard_mark(marks: dict[CacheEngineKey, set[int]], key: CacheEngineKey, mark: int) -> bool:
    """Take ``mark`` out of ``marks[key]``, the key out once it has none; whether it has none.

    Idempotent, so a clean-up an interrupt landed in may simply be done again.
    """
    held = marks.get(key)
    if held is None:
        return True
    held.discard(mark)
    if held:
        return False
    del marks[key]
    return True


class _Victims(builtins.list):  # type: ignore[type-arg]
    """Keys one eviction took out of the disk tier's index, with the token of their drop marks."""

    __slots__ = ("token",)

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token


class LMCLocalDiskBackend(LMCBackendInterface):
    """KV chunks as files in one directory, LRU under a byte budget.

    The directory comes from ``config.local_disk`` or ``local_device="file://<dir>"``;
    the budget from ``max_local_disk_size`` (GB) when > 0, else
    ``max_local_cache_size``. The budget counts whole files (header + payload).
    Writes are atomic (temp file + ``os.replace``); at
    start the index and byte count are rebuilt from the directory, so a restart
    reuses the cache and the budget holds, and dead writers' temp files are
    removed. A write the filesystem refuses as full (``ENOSPC``, ``EDQUOT``: the budget
    may be larger than the room the disk has) unlinks the tier's least recently used
    chunks, a chunk's worth, and is tried again (``FULL_DISK_RETRIES`` times at most);
    only then, or at once when the tier holds nothing else to let go or has no budget
    (``UNLIMITED_GB``: a tool's store, which never evicts), is it a ``StoreFullError``.
    A corrupt, truncated or foreign file is a miss and is deleted; a file whose header
    key is empty (``save_disk(path, kv_chunk)``) is taken as the key of its path.

    Non-blocking puts are written by ``put_workers`` threads (each runs
    ``put_worker()``), in parallel across keys. Every put and remove of a key gets
    a sequence number when it is submitted; a write that finds a later put (or a
    remove) of its key already committed is discarded, so the last submitted
    operation wins whatever order the workers finish in. Once ``max_queued_bytes``
    (default 1 GiB) are queued, a non-blocking put waits for room.

    Thread-safe. Several processes may share one directory: each sees the others'
    chunks, and a chunk removed by another process is a miss, never an error;
    the budget is enforced by each process over the chunks it knows. Fork-safe:
    a forked child gets, on first use, its own locks, queue and writer threads;
    writes the parent had in flight at fork() are the parent's to finish.
    """

    def __init__(
        self,
        config: LMCacheEngineConfig,
        metadata: LMCacheMemPoolMetadata | LMCacheEngineMetadata | None = None,
        dst_device: str = "cuda",
        *,
        fsync: bool = False,
        put_workers: int = 2,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        super().__init__(dst_device)
        if put_workers < 1:
            raise ValueError(f"put_workers must be >= 1, got {put_workers}")
        root = config.disk_path
        if not root:
            raise ValueError("local_disk: no directory configured (set local_disk or local_device=file://<dir>)")
        self.config = config
        self.root = os.path.abspath(os.path.expanduser(root))
        os.makedirs(self.root, exist_ok=True)
        self.fsync = fsync
        self._index: LRUIndex[CacheEngineKey] = LRUIndex(config.disk_budget_bytes, CacheEngineKey.as_tuple)
        self._lock = threading.Lock()
        # Chunks put_nonblocking queued that no writer has finished, bounded (backpressure).
        self._queued = QueuedBytes(self._lock, max_queued_bytes)
        # The newest non-blocking put of each key (what a read of the key waits for).
        self._futures: dict[CacheEngineKey, Future[None]] = {}
        # Last submitted wins: sequence numbers given at submit time; per key, the
        # number of puts in flight and the sequence below which they are stale
        # (kept only while some are in flight).
        self._seq = itertools.count()
        # Sequence numbers rather than a count: ending one is idempotent, so a clean-up
        # an interrupt landed in may simply be done again.
        self._inflight: dict[CacheEngineKey, set[int]] = {}
        self._floor: dict[CacheEngineKey, int] = {}
        # Serialise, per key, what changes its file: commit (replace + index),
        # remove, eviction's unlink, quarantine. Striped: different keys rarely wait.
        self._key_locks = [threading.Lock() for _ in range(_KEY_LOCKS)]
        # Keys being unlinked right now (with a count): a reader that opened the file
        # just before must not put them back in the index (a ghost entry).
        # Each mark is the token of one eviction (``_Victims``), so taking it back twice
        # is harmless: a clean-up an interrupt landed in is simply done again.
        self._dropping: dict[CacheEngineKey, set[int]] = {}
        pin = self._dst.type == "cuda"
        self._pool = BufferPool("cpu", max_bytes=read_pool_bytes(metadata), pin_memory=pin)
        # A SimpleQueue: its put is one C call (see _submit_locked).
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ends_queued = 0  # end signals queued for the writers (close())
        self._readers: ThreadPoolExecutor | None = None
        self._readers_lock = threading.Lock()
        self._closed = False
        self.stale_temps_removed = 0
        self._last_full_sweep = -math.inf  # time.monotonic() of the last full-disk temp sweep
        self._full_disk_backoff = 0.0  # seconds of the latest full-disk backoff (0: none)
        self._full_disk_quiet_until = -math.inf  # time.monotonic() until which none is let go
        # A store with no budget (the tools') never evicts: a full disk fails its writes.
        self._evicts_when_full = config.disk_budget_bytes < UNLIMITED_GB * GB
        self._rebuild_index()
        self._put_workers = put_workers
        self._workers = self._start_workers()
        drain_at_exit(self)  # queued writes are stored at interpreter exit, as a thread pool's

    def _start_workers(self) -> builtins.list[threading.Thread]:
        workers = [
            threading.Thread(target=self.put_worker, name=f"lmcache-disk-put-{i}", daemon=True)
            for i in range(self._put_workers)
        ]
        for worker in workers:
            worker.start()
        return workers

    def _after_fork(self) -> None:
        # A lock a parent thread held at fork() would stay held here forever.
        self._lock = threading.Lock()
        self._queued = QueuedBytes(self._lock, self._queued.max_bytes)  # the parent's queue stays the parent's
        self._key_locks = [threading.Lock() for _ in range(_KEY_LOCKS)]
        self._readers = None  # the parent's reader thread does not exist here
        self._readers_lock = threading.Lock()
        # Pinning needs CUDA, which a child forked after the parent used it cannot
        # initialise: plain buffers there, not a RuntimeError on every get.
        pin = self._pool.pin_memory and not torch.cuda._is_in_bad_fork()
        self._pool = BufferPool("cpu", max_bytes=self._pool.max_bytes, pin_memory=pin)
        # The parent's queued and running writes are the parent's: their futures
        # never complete here (a read would wait forever), and repeating them here
        # could put back what the parent superseded since. Its bookkeeping of
        # them (in-flight counts, floors, unlinks under way) is dropped with them.
        self._futures = {}
        self._inflight = {}
        self._floor = {}
        self._dropping = {}
        self._queue = queue.SimpleQueue()
        self._ends_queued = 0
        if not self._closed:
            self._workers = self._start_workers()

    def describe(self) -> str:
        return f"disk {self.root}"

    def _path(self, key: CacheEngineKey) -> str:
        return layout.disk_path(self.root, key)

    def _key_lock(self, key: CacheEngineKey) -> threading.Lock:
        return self._key_locks[hash(key) % _KEY_LOCKS]

    def _remove_if_stale_temp(self, path: str, st: os.stat_result, now: float) -> int:
        """Unlink ``path`` when it is a dead writer's temp file; the bytes freed (0 if not)."""
        name = os.path.basename(path)
        if not (layout.is_temp_name(name) and layout.is_stale_temp(name, st.st_mtime, now)):
            return 0
        try:
            disk_io.unlink(path)
        except OSError:
            return 0
        with self._lock:  # put threads sweep too (a full disk)
            self.stale_temps_removed += 1
        self.stats.incr("stale_temps_removed")
        return st.st_size

    def _sweep_stale_temps(self) -> int:
        """Remove dead writers' temp files (a writer killed mid-put leaves one, up to a
        chunk's size); the bytes freed. One scan of the store, no lock held."""
        now = time.time()
        return sum(self._remove_if_stale_temp(path, st, now) for path, st, key in scan_store(self.root) if key is None)

    def _rebuild_index(self) -> None:
        now = time.time()
        found: list[tuple[float, CacheEngineKey, int]] = []
        for path, st, key in scan_store(self.root):
            if key is None:
                self._remove_if_stale_temp(path, st, now)
                continue
            found.append((max(st.st_atime, st.st_mtime), key, st.st_size))
        found.sort(key=lambda item: item[0])
        over: builtins.list[CacheEngineKey] = []
        try:
            with self._lock:
                for _, key, size in found:
                    self._index.add(key, size)
                # The budget may have shrunk since the last run.
                over = self._evict_locked(self._index.victims_over_budget())
        finally:
            try:
                self._unlink_evicted(over)
            except BaseException:
                self._unlink_evicted(over)  # an interrupt landed in the first: once more (idempotent)
                raise
        if self.stale_temps_removed:
            logger.info("removed %d stale temp files under %s", self.stale_temps_removed, self.root)

    # -- writes --------------------------------------------------------------------

    def _file_size_checked(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> int:
        """The chunk's file size; ``ValueError`` when that alone exceeds the whole budget."""
        size = chunk_file_size(kv_chunk, key.to_string())
        if size > self._index.budget:
            nbytes = kv_chunk.numel() * kv_chunk.element_size()
            raise ValueError(
                f"chunk of {nbytes} bytes takes {size} bytes on disk with its header, "
                f"larger than the whole disk budget of {self._index.budget} bytes"
            )
        return size

    def put(self, key: CacheEngineKey, kv_chunk: torch.Tensor, blocking: bool = True) -> None:
        if blocking:
            self.put_blocking(key, kv_chunk)
        else:
            self.put_nonblocking(key, kv_chunk)

    def _check_put(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """What every put checks first (each of the seed's put methods is public)."""
        check_key(key)
        check_chunk(kv_chunk)
        self._file_size_checked(key, kv_chunk)
        if self._closed:
            raise RuntimeError("backend is closed")
        self._check_fork()

    def put_blocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        """Write now; ``OSError``/``StoreFullError`` when the disk refuses (a full disk only
        once the tier's own least recently used chunks could not make room). Thread-safe."""
        self._check_put(key, kv_chunk)
        counted = False
        try:
            with self._lock:
                older = self._futures.get(key)
                seq = self._begin_locked(key)
                counted = True  # nothing an interrupt can land in since the count
            committed = self._write(key, kv_chunk, seq)
        finally:
            if counted:
                try:
                    self._end(key, seq)
                except BaseException:
                    self._end(key, seq)  # an interrupt landed in the first: once more (idempotent)
                    raise
        if committed and older is not None:
            # That queued put is older than this one, so it will be discarded as stale:
            # reads must not wait for it (behind a backlog). A newer one stays.
            with self._lock:
                if self._futures.get(key) is older:
                    del self._futures[key]

    def put_nonblocking(self, key: CacheEngineKey, kv_chunk: torch.Tensor, *, wait: bool = True) -> bool:
        """Queue the write for the workers; the caller must not modify ``kv_chunk`` meanwhile.

        Once ``max_queued_bytes`` are queued, waits for queued writes to finish
        (backpressure: acknowledged only once queued); ``wait=False`` returns False
        instead, queueing nothing (a best-effort fill). Returns True when queued.
        Thread-safe.

        Raises:
            OSError: (``ETIMEDOUT``) no room, and no queued write finished for ``QUEUE_STALL_S``.
            RuntimeError: the backend is closed (also while waiting).
        """
        self._check_put(key, kv_chunk)
        self.buffer_sweeper()
        for_library_threads(kv_chunk)  # a writer copies it to the host on its own stream
        nbytes = kv_chunk.numel() * kv_chunk.element_size()
        future: Future[None] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("backend is closed")
            if not self._room_locked(nbytes, timeout=None if wait else 0):
                return False
            self._submit_locked(key, kv_chunk, future, nbytes)
        return True

    def _submit_locked(self, key: CacheEngineKey, kv_chunk: torch.Tensor, future: Future[None], nbytes: int) -> None:
        """Queue a write for the workers (under ``_lock``): all of it, or none when interrupted.

        A ``KeyboardInterrupt`` landing part way left a future no writer would ever
        complete (a get of the key waited on it for good), queued bytes that never
        drained and a put counted in flight for good. Each step below is one statement
        whose interruption points (a key's Python ``__hash__``/``__eq__``, a method's
        start) all come before it takes effect, and ``stage`` follows them. After the
        last, the only point left is the return of the queue's put (one C call), with
        the item queued: the writer then finishes it, so nothing is undone.
        """
        older = self._futures.get(key)
        stage = 0
        try:
            seq = self._begin_locked(key)
            stage = 1
            self._futures[key] = future
            stage = 2
            self._queued.add_locked(nbytes)
            stage = 3
            self._queue.put((key, kv_chunk, seq, future, nbytes))
        except BaseException:
            if stage < 3:
                if stage == 2:
                    if older is None:
                        del self._futures[key]
                    else:
                        self._futures[key] = older
                if stage >= 1:
                    self._end_locked(key, seq)
                future.set_result(None)
            raise

    def wait_for_queue_room(self, nbytes: int, timeout: float) -> bool:
        """Wait up to ``timeout`` s until a ``put_nonblocking`` of ``nbytes`` would not wait;
        whether it would not (another put may take the room first). Thread-safe."""
        self._check_fork()
        with self._lock:
            return not self._closed and self._room_locked(nbytes, timeout=timeout)

    def _room_locked(self, nbytes: int, timeout: float | None) -> bool:
        return self._queued.wait_for_room_locked(
            nbytes,
            stall_s=QUEUE_STALL_S,
            closed=lambda: self._closed,
            stalled=lambda why: OSError(errno.ETIMEDOUT, why, self.root),
            stats=self.stats,
            timeout=timeout,
        )

    @property
    def max_queued_bytes(self) -> int:
        """Bytes of chunks ``put_nonblocking`` may have queued before a put waits for room."""
        return self._queued.max_bytes

    @max_queued_bytes.setter
    def max_queued_bytes(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_queued_bytes must be >= 1, got {value}")
        with self._lock:
            self._queued.max_bytes = value

    def put_worker(self) -> None:
        """Body of each background writer thread: write queued chunks until the end signal."""
        while True:
            item = self._queue.get()
            if isinstance(item, LocalBackendEndSignal):
                return
            key, chunk, seq, future, nbytes = item
            try:
                self._background_put(key, chunk, seq)
            finally:
                with self._lock:
                    self._queued.done_locked(nbytes)
                future.set_result(None)

    def _background_put(self, key: CacheEngineKey, kv_chunk: torch.Tensor, seq: int) -> None:
        """One queued write; failures are logged and counted, never silent."""
        try:
            self._write(key, kv_chunk, seq)
        except Exception:
            logger.exception("background write of %s to %s failed", key, self.root)
            self.stats.incr("background_put_failures")
            self._forget_older(key, seq)
        finally:
            self._end(key, seq)

    def _forget_older(self, key: CacheEngineKey, seq: int) -> None:
        """Put ``seq`` of ``key`` failed in the background: remove the file of an older put.

        The caller was told the write was queued, and may already have dropped its
        own copy (a hybrid's memory tier evicts it): a later get served the chunk this
        put replaced, a wrong tensor for the key. Now it is a miss, and older puts
        still in flight are discarded as stale. A newer put or remove that committed
        meanwhile is left alone. Failures here are logged only (the put's are counted).
        """
        marked: builtins.list[CacheEngineKey] = []
        with self._key_lock(key):  # throughout, as _drop: no older put commits in between
            try:
                with self._lock:
                    if self._stale_locked(key, seq):
                        return  # a newer put or a remove committed since: that is the key's now
                    self._floor[key] = seq
                    marked = self._evict_locked([key])
            finally:
                try:
                    self._unlink_evicted(marked, stat="failed_put_forgotten", key_locked=True)
                except Exception as exc:
                    logger.warning("removing the older chunk of %s after its put failed: %s", key, exc)

    def _begin_locked(self, key: CacheEngineKey) -> int:
        """A new sequence number for a put of ``key``, counted in flight (under ``_lock``).

        It is counted last, in one statement: an interrupt lands before that or not at all.
        """
        seq = next(self._seq)
        seqs = self._inflight.get(key)
        # A new set, stored in one statement: after ``set.add`` (a C call) an interrupt
        # could land on its return, with the count made and ``seq`` lost to the caller.
        self._inflight[key] = {seq} if seqs is None else seqs | {seq}
        return seq

    def _end(self, key: CacheEngineKey, seq: int) -> None:
        with self._lock:
            self._end_locked(key, seq)

    def _end_locked(self, key: CacheEngineKey, seq: int) -> None:
        """Put ``seq`` of ``key`` is no longer in flight. Idempotent."""
        if _discard_mark(self._inflight, key, seq):
            self._floor.pop(key, None)  # kept only while puts of the key are in flight

    def _stale_locked(self, key: CacheEngineKey, seq: int) -> bool:
        return self._floor.get(key, -1) > seq

    def _write(self, key: CacheEngineKey, kv_chunk: torch.Tensor, seq: int) -> bool:
        """Write and commit put number ``seq`` of ``key``; False when a later one superseded it."""
        size = self._file_size_checked(key, kv_chunk)
        victims: builtins.list[CacheEngineKey] = []
        # Victims are unlinked in a finally: an interrupt landing as the lock is let go
        # left them out of the index, marked as dropping, and their files in place.
        try:
            with self._lock:
                if self._stale_locked(key, seq):
                    self.stats.incr("superseded_puts")
                    return False
                # Make room first, so the disk has space for the new file.
                victims = self._evict_live_locked(lambda: self._index.victims_for(size, exclude=key))
        finally:
            try:
                self._unlink_evicted(victims)
            except BaseException:
                self._unlink_evicted(victims)  # an interrupt landed in the first: once more (idempotent)
                raise
        path = self._path(key)
        retries = 0
        while True:
            tmp = layout.temp_path(path)
            try:
                written = _write_temp(tmp, kv_chunk, key.to_string(), self.fsync, make_dir=True)
                committed = self._commit(key, seq, tmp, path, written)
                break
            except OSError as exc:
                # The budget may be larger than the room the filesystem has (or the
                # quota allows): a full disk would otherwise fail every put for good
                # while the tier sits on chunks it could let go. The failed try's temp
                # file is gone already (_write_temp, _commit discard it).
                full = exc.errno in disk_io.FULL_ERRNOS
                if full and retries < FULL_DISK_RETRIES and self._may_let_go_for_full_disk():
                    room = self._make_room_on_full_disk(key, seq, size)
                    if room is None:  # a later put or remove of the key committed meanwhile
                        self.stats.incr("superseded_puts")
                        return False
                    if room:
                        retries += 1
                        self.stats.incr("full_disk_retries")
                        continue
                self.stats.incr("put_failures")
                if full:
                    if retries:
                        self._back_off_full_disk(key)
                    raise StoreFullError(self.describe(), f"no space left writing {key} ({exc.strerror})") from exc
                raise
            except BaseException:
                # An interrupt between the write and the commit's own clean-up left the
                # temp file for good (a reopen in this process keeps a live pid's).
                _discard_temp(tmp)
                raise
        if self._full_disk_backoff:  # the disk took a write again: let go freely (a racy read is harmless)
            with self._lock:
                self._full_disk_backoff, self._full_disk_quiet_until = 0.0, -math.inf
        self.stats.incr("puts" if committed else "superseded_puts")
        return committed

    def _may_let_go_for_full_disk(self) -> bool:
        """Whether a full disk may make this tier unlink chunks now (it has a budget, and
        no backoff is running)."""
        return self._evicts_when_full and time.monotonic() >= self._full_disk_quiet_until

    def _back_off_full_disk(self, key: CacheEngineKey) -> None:
        """Chunks were let go and the write still failed: let none go for a while."""
        with self._lock:
            self._full_disk_backoff = min(
                FULL_DISK_BACKOFF_MAX_S, max(FULL_DISK_BACKOFF_S, 2 * self._full_disk_backoff)
            )
            self._full_disk_quiet_until = time.monotonic() + self._full_disk_backoff
            backoff = self._full_disk_backoff
        logger.warning(
            "disk under %s stays full though chunks were let go for %s: no chunk is let go "
            "for a full disk for %.0f s (puts fail as StoreFullError meanwhile)",
            self.root, key, backoff,
        )

    def _make_room_on_full_disk(self, key: CacheEngineKey, seq: int, size: int) -> bool | None:
        """After a full-disk error writing put ``seq`` of ``key``: unlink this tier's least
        recently used chunks, ``size`` bytes' worth, never ``key`` itself.

        Returns whether any chunk file went (a retry may now fit), or None when the put
        was superseded meanwhile (nothing to retry). A get that has the file open keeps
        reading it (POSIX), so readers need no guard; a chunk committed again meanwhile
        is kept (``_unlink_evicted``).
        """
        with self._lock:
            if self._stale_locked(key, seq):
                return None
            sweep = time.monotonic() - self._last_full_sweep >= FULL_DISK_SWEEP_S
            if sweep:
                self._last_full_sweep = time.monotonic()
        # Dead writers' temp files first: garbage, where the chunks are what the tier is
        # for. Start-up removes them too, but a process that keeps running never starts
        # again, and one of another PID namespace (a restarted container) may judge them
        # only by age (layout.STALE_TEMP_SECONDS). At most once a minute: a full disk
        # sends every put here, and the sweep is a scan of the whole store.
        swept = self._sweep_stale_temps() if sweep else 0
        victims: builtins.list[CacheEngineKey] = []
        try:
            with self._lock:
                victims = self._evict_live_locked(lambda: self._index.oldest(size - swept, skip=key))
        finally:
            try:
                unlinked = self._unlink_evicted(victims)
            except BaseException:
                self._unlink_evicted(victims)  # an interrupt landed in the first: once more (idempotent)
                raise
        if unlinked:
            self.stats.incr("full_disk_evictions", unlinked)
        if unlinked or swept:
            # A warning once a minute at most (a full disk sends every put here); the
            # counters (full_disk_retries, full_disk_evictions) keep the whole count.
            logger.log(
                logging.WARNING if sweep else logging.DEBUG,
                "disk under %s is full: removed %d bytes of dead writers' temp files and "
                "%d least recently used chunks to write %s",
                self.root, swept, unlinked, key,
            )
        return unlinked > 0 or swept > 0

    def _commit(self, key: CacheEngineKey, seq: int, tmp: str, path: str, size: int) -> bool:
        """Move the temp file of put ``seq`` into place unless a later put/remove committed."""
        over: builtins.list[CacheEngineKey] = []
        try:
            with self._key_lock(key):
                with self._lock:
                    stale = self._stale_locked(key, seq)
                if stale:
                    _discard_temp(tmp)
                    return False
                try:
                    disk_io.replace(tmp, path)
                    with self._lock:
                        self._floor[key] = seq
                        self._index.add(key, size)
                        # Concurrent writers may have filled the budget meanwhile.
                        over = self._evict_live_locked(lambda: self._index.victims_over_budget(keep=key))
                except BaseException:
                    if os.path.lexists(tmp):  # not renamed: nothing committed
                        _discard_temp(tmp)
                        raise
                    # Renamed (an interrupt may land just after): the file is in place, so
                    # it is counted, and older puts of the key stay stale (no other commit
                    # or remove of it runs meanwhile: the key's lock).
                    with self._lock:
                        self._floor[key] = seq
                        if self._index.size_of(key) != size:
                            self._index.add(key, size)
                    raise
        finally:
            # Outside the key's lock (a victim's may be the same stripe), and whatever
            # was raised: the victims are out of the index and marked as dropping.
            try:
                self._unlink_evicted(over)
            except BaseException:
                self._unlink_evicted(over)  # an interrupt landed in the first: once more (idempotent)
                raise
        return True

    def buffer_sweeper(self) -> None:
        """Forget finished futures (and so the chunks they held). Thread-safe."""
        self._check_fork()
        with self._lock:
            done = [k for k, f in self._futures.items() if f.done()]
            for k in done:
                del self._futures[k]

    def _wait_pending(self, key: CacheEngineKey) -> None:
        with self._lock:
            future = self._futures.get(key)
        if future is not None:
            future.result()

    # -- eviction and removal --------------------------------------------------------

    def _evict_locked(self, victims: builtins.list[CacheEngineKey]) -> _Victims:
        """Take ``victims`` out of the index now and mark them as dropping (under ``_lock``);
        unlink them with ``_unlink_evicted``, which takes the marks back.

        All or nothing: interrupted part way, the victims taken so far go back into
        the index (at its LRU end) unmarked, since no unlink follows (a mark never taken
        back kept the key from being learnt again; a file out of the index was never
        counted again).
        """
        token = next(self._seq)
        popped: builtins.list[tuple[CacheEngineKey, int | None]] = []
        try:
            for victim in victims:
                # One append after the pop, with no interruption point between.
                popped.append((victim, self._index.pop(victim)))
                marks = self._dropping.get(victim)
                if marks is None:
                    self._dropping[victim] = {token}
                else:
                    marks.add(token)
            taken = _Victims(token)
            taken.extend(victims)
        except BaseException:
            for victim, size in popped:
                if size is not None and victim not in self._index:
                    self._index.add(victim, size, recent=False)
                self._undrop_locked(victim, token)
            raise
        return taken

    def _evict_live_locked(self, pick: Callable[[], builtins.list[CacheEngineKey]]) -> _Victims:
        """``_evict_locked(pick())``, after forgetting picked entries whose file is gone.

        Another process (``lmcache evict``, another server on the directory) may have
        removed indexed chunks: their bytes are free already, and counting them sent
        live chunks out in their place. Only the picked victims are checked (a stat
        each), so ghosts are found as they reach the LRU end, where an evict by age
        or size leaves them.
        """
        while True:
            victims = pick()
            gone = [v for v in victims if not os.path.exists(self._path(v))]
            if not gone:
                return self._evict_locked(victims)
            for victim in gone:
                self._index.pop(victim)
            self.stats.incr("forgotten", len(gone))

    def _undrop_locked(self, key: CacheEngineKey, token: int) -> None:
        """Take back eviction ``token``'s mark on ``key`` (under ``_lock``). Idempotent."""
        _discard_mark(self._dropping, key, token)

    def _undrop(self, key: CacheEngineKey, token: int) -> None:
        with self._lock:
            self._undrop_locked(key, token)

    def _unlink_evicted(
        self,
        victims: builtins.list[CacheEngineKey],
        *,
        stat: str | None = "evictions",
        strict: bool = False,
        key_locked: bool = False,
    ) -> int:
        """Unlink the files of ``victims`` (``_evict_locked``'s); how many went (counted as ``stat``).

        A failed unlink (other than a file already gone) is logged, or with ``strict``
        raised once its victim's mark is taken back (a remove must report it).
        ``key_locked``: the caller holds the victims' key lock (one victim) already.

        Each victim's mark is taken back once its file is dealt with (unlinked, gone,
        or kept because a put committed it again), never before: called again after an
        interrupt landed in it (every caller does), it finishes the victims still
        marked and leaves the others alone.
        """
        if not isinstance(victims, _Victims):
            return 0  # nothing was evicted
        token = victims.token
        unlinked = 0
        for victim in victims:
            with contextlib.nullcontext() if key_locked else self._key_lock(victim):
                with self._lock:
                    # A put committed it again since (that file is new), or this victim
                    # was dealt with already: keep it.
                    keep = victim in self._index or token not in self._dropping.get(victim, ())
                gone = False
                failed: OSError | None = None
                if not keep:
                    try:
                        disk_io.unlink(self._path(victim))
                        gone = True
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        if not strict:
                            logger.warning("evicting %s failed: %s", victim, exc)
                        failed = exc
                with self._lock:
                    self._undrop_locked(victim, token)
                if strict and failed is not None:
                    raise failed
            if gone:
                unlinked += 1
                if stat is not None:
                    self.stats.incr(stat)
        return unlinked

    def _drop(self, key: CacheEngineKey, *, supersede: bool = False) -> bool:
        """Remove ``key``'s file; ``supersede``: puts of it submitted earlier are discarded.

        Whether a file went. As an eviction: marked, then unlinked, so a remove an
        interrupt lands in is finished, never leaves the file there unindexed; a put
        submitted after it and committed meanwhile is kept (it is newer).
        """
        marked: builtins.list[CacheEngineKey] = []
        # The key's lock throughout: a put of the key that passed its stale check before
        # the floor went up must commit before this (then its file is unlinked here) or
        # not at all; with the lock let go between, it committed in the gap, lowered the
        # floor and was kept as if newer (a removed key came back).
        with self._key_lock(key):
            try:
                with self._lock:
                    if supersede and key in self._inflight:
                        self._floor[key] = next(self._seq)
                    marked = self._evict_locked([key])
            finally:
                try:
                    gone = self._unlink_evicted(marked, stat=None, strict=True, key_locked=True)
                except BaseException:
                    # An interrupt landed in the first: once more (idempotent). After an
                    # unlink error it finds the mark taken back and does nothing.
                    self._unlink_evicted(marked, stat=None, strict=True, key_locked=True)
                    raise
        return gone > 0

    def _learn(self, key: CacheEngineKey, path: str) -> None:
        """Mark ``key`` used, indexing it if another process wrote it (then evict to budget)."""
        over: builtins.list[CacheEngineKey] = []
        try:
            with self._lock:
                if key in self._index:
                    self._index.touch(key)
                    return
                if self._dropping.get(key):
                    return
                try:
                    # Under the lock: an eviction that finished since our read has
                    # unlinked the file, and indexing it would leave a ghost entry.
                    size = os.stat(path).st_size
                except OSError:
                    return
                self._index.add(key, size)
                # The budget holds over chunks learnt from other processes too.
                over = self._evict_live_locked(lambda: self._index.victims_over_budget(keep=key))
        finally:
            if over:  # a get's path: no call when nothing was evicted
                try:
                    self._unlink_evicted(over)
                except BaseException:
                    self._unlink_evicted(over)  # an interrupt landed in the first: once more (idempotent)
                    raise

    # -- reads ---------------------------------------------------------------------

    def get(self, key: CacheEngineKey) -> torch.Tensor | None:
        return self._get(key)

    def _get(
        self, key: CacheEngineKey, helper: Any = None, *, stream: torch.cuda.Stream | None = None
    ) -> torch.Tensor | None:
        """``get``; ``helper`` is ``read_chunk``'s (``chunk_format.ALONE``: this thread only);
        ``stream``: the caller's, when this runs on a reader thread for it."""
        check_key(key)
        self._check_fork()
        self._wait_pending(key)
        path = self._path(key)
        st: os.stat_result | None = None
        try:
            with disk_io.open_read(path) as f:
                st = os.fstat(f.fileno())
                # An empty key (written by the seed's save_disk(path, kv_chunk)) is
                # taken as the key of its path; another key, or none at all, is refused.
                tensor = chunk_format.read_chunk(
                    f, key.to_string(), self._pool.acquire, total_size=st.st_size, unkeyed_ok=True, helper=helper
                )
                if time.time() - st.st_atime > ATIME_REFRESH_S:
                    _mark_read(f.fileno(), st)  # this file, not one a put may have renamed over it since
        except FileNotFoundError:
            with self._lock:
                if not os.path.exists(path):  # not re-created by a put meanwhile
                    self._index.pop(key)
            self.stats.incr("misses")
            return None
        except CorruptChunkError as exc:
            self._quarantine(key, path, exc, st)
            return None
        except OSError as exc:  # EIO and friends: a miss, the file may be fine later
            logger.warning("reading %s failed: %s", path, exc)
            self.stats.incr("read_errors")
            self.stats.incr("misses")
            return None
        self._learn(key, path)
        self.stats.incr("hits")
        return self._to_dst(tensor, stream)

    def batched_get(self, keys: Iterable[CacheEngineKey]) -> list[torch.Tensor | None]:
        """Chunks aligned with ``keys``; two chunks read at a time (``preadv`` releases the GIL).

        The calling thread and one reader take keys from a shared counter, so the
        caller works instead of waiting (16 hot 2 MiB chunks: 5.2-5.7 ms on two pool
        threads, 3.4-3.7 ms this way, 4.1-4.5 ms one after another). Each thread reads
        and hashes its chunk alone (``chunk_format.ALONE``), where a single ``get``
        of ``chunk_format.SPLIT_READ_MIN_BYTES`` or more splits it with a helper (as
        the caller does here when the reader pool is shut down). If both threads
        fail, the caller's error is raised. Thread-safe.
        """
        keys = list(keys)
        self._check_fork()  # before _read_pool(): the parent's reader does not exist in a child
        if len(keys) < 2:
            return [self.get(k) for k in keys]
        for key in keys:
            check_key(key)  # before any read: a bad key fails the call, not one thread
        out: list[torch.Tensor | None] = [None] * len(keys)
        next_index = [0]
        claim_lock = threading.Lock()
        stream = caller_stream(self._dst)  # the reader's GPU copies are for the caller's stream

        def work(helper: Any = chunk_format.ALONE) -> None:
            while True:
                with claim_lock:
                    i = next_index[0]
                    if i >= len(keys):
                        return
                    next_index[0] = i + 1
                try:
                    out[i] = self._get(keys[i], helper, stream=stream)
                except BaseException:
                    with claim_lock:
                        next_index[0] = len(keys)  # the other thread stops too
                    raise

        try:
            helping = self._read_pool().submit(work)
        except RuntimeError:  # the reader pool is shut down (closed store, interpreter exit)
            work(None)  # one chunk at a time, so each may split over a checksum helper
            return out
        try:
            work()
        except BaseException:
            if not helping.cancel():
                futures_wait([helping])  # the caller's error is the one raised
            raise
        if not helping.cancel():
            helping.result()
        return out

    def _read_pool(self) -> ThreadPoolExecutor:
        with self._readers_lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-disk-read")
            return self._readers

    def _quarantine(self, key: CacheEngineKey, path: str, exc: Exception, st: os.stat_result | None) -> None:
        """Delete the corrupt file that was read (not a good one a put put there since)."""
        self.stats.incr("corrupt")
        self.stats.incr("misses")
        with self._key_lock(key):
            try:
                now = os.stat(path)
            except FileNotFoundError:
                with self._lock:
                    self._index.pop(key)
                return
            except OSError:
                return
            if st is not None and (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                return  # replaced since it was read
            logger.warning("corrupt chunk %s removed: %s", path, exc)
            marked: _Victims | None = None
            try:
                with self._lock:
                    # Marked as dropping, as eviction does: a contains() or get() until the
                    # unlink must not index the file again (a ghost entry, counted in
                    # used_bytes, after the file is gone).
                    marked = self._evict_locked([key])
                _remove_if_same(path, st)
            except OSError:
                pass
            finally:
                if marked is not None:
                    try:
                        self._undrop(key, marked.token)
                    except BaseException:
                        self._undrop(key, marked.token)  # an interrupt landed in the first: once more
                        raise

    def contains(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is queued or its chunk file is there. Thread-safe.

        An indexed key is checked on disk too (one ``stat``): another process
        (its eviction, ``lmcache evict``) or an operator may have removed the file,
        and a True for it promised a hit that every later get missed.
        """
        check_key(key)
        self._check_fork()
        with self._lock:
            future = self._futures.get(key)
            if future is not None and not future.done():
                return True
            indexed = key in self._index
        path = self._path(key)
        if not _is_file(path):
            if indexed:
                with self._lock:
                    if not _is_file(path):  # not re-created by a put of ours meanwhile
                        self._index.pop(key)
            return False
        if not indexed:
            self._learn(key, path)
        return True

    def touch(self, key: CacheEngineKey) -> None:
        check_key(key)
        self._check_fork()
        with self._lock:
            self._index.touch(key)

    def remove(self, key: CacheEngineKey) -> bool:
        """Remove ``key``; puts of it submitted before are discarded, not waited for."""
        check_key(key)
        self._check_fork()
        with self._lock:
            future = self._futures.pop(key, None)
            was_pending = future is not None and not future.done()
        return self._drop(key, supersede=True) or was_pending

    def list_info(self) -> builtins.list[ChunkInfo]:
        """Rescans the directory, so chunks of other processes are listed too."""
        self.buffer_sweeper()
        with self._lock:
            pending = [k for k, f in self._futures.items() if not f.done()]
        infos = [
            ChunkInfo(key, st.st_size, st.st_mtime, st.st_atime)
            for _, st, key in scan_store(self.root)
            if key is not None
        ]
        seen = {i.key for i in infos}
        return infos + [ChunkInfo(k) for k in pending if k not in seen]

    def list(self) -> list[CacheEngineKey]:
        return [info.key for info in self.list_info()]

    def read_header(self, key: CacheEngineKey) -> ChunkHeader | None:
        check_key(key)
        self._check_fork()
        self._wait_pending(key)
        try:
            with disk_io.open_read(self._path(key)) as f:
                size = os.fstat(f.fileno()).st_size
                return chunk_format.read_header(f, total_size=size)
        except (OSError, CorruptChunkError):
            return None

    @property
    def used_bytes(self) -> int:
        self._check_fork()
        with self._lock:
            return self._index.used

    def close(self) -> None:
        """Write every queued chunk, then stop the writer and reader threads. Idempotent."""
        self._check_fork()  # in a child: its own writers, which close must drain
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queued.wake_all_locked()  # a put waiting for room raises now
            # Counted, so a close interrupted part way queues the rest next time (one
            # too many, when the interrupt lands on a put's return, is harmless).
            while self._ends_queued < len(self._workers):
                self._queue.put(LocalBackendEndSignal())
                self._ends_queued += 1
        # Every close waits, not only the first: one interrupted in its join (the exit
        # drain's caller, a Ctrl-C) must not leave a later close returning early.
        me = threading.current_thread()
        for worker in self._workers:
            if worker is not me:
                worker.join()
        with self._readers_lock:
            if self._readers is not None:
                self._readers.shutdown(wait=True)
        self.buffer_sweeper()
        forget_at_exit(self)
