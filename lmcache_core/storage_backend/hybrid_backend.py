"""Local tier(s) in front of a remote one: write-through, read-through, prefetch."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from lmcache_core.chunk_format import MAX_HEADER_BYTES, ChunkHeader
from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata, LMCacheMemPoolMetadata
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.abstract_backend import (
    ChunkInfo,
    LMCBackendInterface,
    check_chunk,
    check_key,
)
from lmcache_core.storage_backend.devices import finished
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend, chunk_file_size

if TYPE_CHECKING:
    from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend

logger = logging.getLogger(__name__)

# The base class's dst_device property: the hybrid's setter runs it, then sets the tiers'.
_BASE_DST_DEVICE: property = vars(LMCBackendInterface)["dst_device"]

# Fills of a key and the start of its writes are serialised by one of these locks (by the
# key's hash). A fill holds its lock while it copies into the memory tier: enough of them
# that different keys rarely wait for each other.
_KEY_STRIPES = 64


class _Mark:
    """A put, remove or filling read of one key under way, registered in its stripe.

    The caller makes it before the ``try`` and ends it first thing in the ``finally``
    with ``mark.marks.discard(mark)``: one C call, so no interrupt (Ctrl-C, a signal
    handler's exception; CPython runs handlers only at a function's start, a loop's
    back edge or after a call returns) lands between the end of the operation and
    that undo, and none between registering and ``marks`` pointing at where it was
    registered. A count left behind by an interrupt (before the ``try``, or at the call
    to the clean-up method in the ``finally``) made every later read of the key start
    stale: its read-through fills and prefetch copies were cancelled for good.
    """

    __slots__ = ("marks",)

    def __init__(self) -> None:
        self.marks: set[Any] = set()  # where it is registered (its own empty set until then)

    # Identity hashing and equality, inherited from ``object`` (C): no interrupt lands
    # inside a set operation on marks.


class _Read(_Mark):
    """A read of a key from a slower tier, whose hit would fill the faster tiers.

    ``stale``: a put or remove of the key overlapped the read, so what it read may be
    older than what the faster tiers hold (or the key is gone): no fill.
    """

    __slots__ = ("stale",)

    def __init__(self) -> None:
        super().__init__()
        self.stale = False


class _Write(_Mark):
    """A put or remove of a key under way."""

    __slots__ = ()


class _KeyStripe:
    """Under ``lock``: the writes in flight of its keys, and their reads that may fill.

    Entries live only while their operation runs (an empty set an interrupted clean-up
    left is taken again by the key's next operation), so it never grows with the
    number of keys ever written. An operation ends by taking its mark out of its set
    without the lock (one C call, atomic under the GIL); a set is added to and
    dropped from the dicts under the lock.
    """

    __slots__ = ("lock", "writes", "reads")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writes: dict[CacheEngineKey, set[_Write]] = {}
        self.reads: dict[CacheEngineKey, set[_Read]] = {}


def _abandon(sent: Callable[[], None]) -> None:
    """Abandon the remote send ``sent`` waits for (``start_put``'s): an interrupt landing
    as the wait is called, before its own ``try``, left it running, and the caller's
    next bytes in its buffer could be stored under the key with a valid checksum."""
    abandon = getattr(sent, "abandon", None)
    if abandon is not None:
        abandon()


class LMCHybridBackend(LMCBackendInterface):
    """Memory and/or disk tiers in front of an optional remote store.

    * write-through: ``put`` stores in every local tier now, and in the remote
      (non-blocking unless ``blocking=True``); either way the caller may reuse
      its tensor once ``put`` returns (the remote's queued write has its own copy);
    * read-through: a miss in a fast tier that hits a slower one fills the
      faster tiers (memory at once, disk in the background);
    * ``batched_get`` serves local hits and fetches all local misses from the
      remote in one batched call (pipelined when configured);
    * ``config.prefetch``: a background thread copies this model's / rank's
      remote chunks into the local tiers that lack them, bounded by local capacity;
      it never blocks construction and skips foreign keys;
    * a remote that is down never raises into the caller: local tiers keep serving;
    * ``dst_device`` set after construction is set on every tier too. The disk
      and remote tiers read onto the host (``dst_device="cpu"``) unless the memory
      tier lives on a GPU: their hits fill host tiers, and go to ``dst_device``
      once, after the fills (to a GPU and back to a CPU memory tier cost two
      transfers over PCIe per hit, and prefetch paid them for every chunk).

    Fills never keep the tensor handed to the caller: a memory fill copies it
    at once, a disk fill writes a private copy, so modifying a tensor returned by
    a disk or remote hit changes no tier (a memory hit is zero-copy; see
    ``LMCLocalBackend``).

    A fill (or prefetch) never wins over a write: a ``put`` or ``remove`` of the key
    that overlaps the read it copies from cancels it, and one that starts after the
    fill was made is submitted after it to every tier (the disk tier keeps the last
    submitted write of a key, queued fills included), so what the faster tiers hold
    is never older than what the slower ones do, and a removed key stays removed.

    Thread-safe. Fork-safe: a forked child gets, on first use, its own counters and
    locks (its tiers rebuild theirs), and no prefetch (``prefetch_done`` is set).
    """

    def __init__(
        self,
        config: LMCacheEngineConfig,
        metadata: LMCacheEngineMetadata | None,
        mpool_metadata: LMCacheMemPoolMetadata | None = None,
        dst_device: str = "cuda",
    ) -> None:
        super().__init__(dst_device)

        self.config = config
        self.metadata = metadata
        self._tiers: list[tuple[str, LMCBackendInterface]] = []
        self._memory: LMCLocalBackend | None = None
        # Checked before any tier exists: a remote built first would leak its threads.
        if config.local_memory_device is None and config.disk_path is None:
            raise ValueError("LMCHybridBackend needs a local tier (local_device or local_disk)")
        try:
            if config.local_memory_device is not None:
                self._memory = LMCLocalBackend(config, mpool_metadata, dst_device)
                self._tiers.append(("memory", self._memory))
            if config.disk_path is not None:
                self._tiers.append(("disk", LMCLocalDiskBackend(config, mpool_metadata, dst_device)))
            self.remote: LMCRemoteBackend | None = None
            if config.remote_url is not None:
                from lmcache_core.storage_backend.remote_backend import (
                    LMCPipelinedRemoteBackend,
                    LMCRemoteBackend,
                )

                cls = LMCPipelinedRemoteBackend if config.pipelined_backend else LMCRemoteBackend
                self.remote = cls(config, metadata, dst_device)
        except BaseException:
            for _, tier in self._tiers:
                tier.close()
            raise
        self.dst_device = dst_device  # now the tiers exist: where each one reads to
        self._stripes = [_KeyStripe() for _ in range(_KEY_STRIPES)]
        self._closing = threading.Event()
        self._closed_all = False  # set once a close() has closed every tier
        self._prefetch_done = threading.Event()
        self.prefetched = 0
        self._prefetch_thread: threading.Thread | None = None
        if config.prefetch and self.remote is not None:
            self._prefetch_thread = threading.Thread(
                target=self._prefetch, name="lmcache-prefetch", daemon=True
            )
            self._prefetch_thread.start()
        else:
            self._prefetch_done.set()

    def _after_fork(self) -> None:
        # The parent's threads (prefetch, callers mid-read or mid-write) do not exist
        # here, and a lock one of them held at fork() would stay held: fresh state.
        self._stripes = [_KeyStripe() for _ in range(_KEY_STRIPES)]
        closing = self._closing.is_set()
        self._closing = threading.Event()
        if closing:
            self._closing.set()
        # The parent's prefetch thread fills the parent's tiers, not this process's.
        self._prefetch_thread = None
        self._prefetch_done = threading.Event()
        self._prefetch_done.set()

    @property
    def prefetch_done(self) -> threading.Event:
        """Set once prefetch has finished (or was not configured; always in a forked child)."""
        self._check_fork()
        return self._prefetch_done

    # -- introspection -------------------------------------------------------------

    @property
    def dst_device(self) -> str:
        """Where ``get`` puts tensors; reassigning it reassigns it on every tier. Thread-safe."""
        return self._dst_device

    @dst_device.setter
    def dst_device(self, value: str) -> None:
        _BASE_DST_DEVICE.__set__(self, value)
        # The memory tier returns what get hands out (zero-copy when it lives on
        # dst_device). The others read to _lower_dst; get moves their hits to
        # dst_device after the fills. The base __init__ sets this before any tier
        # exists, hence the defaults.
        lower = self._lower_dst(value)
        for name, tier in self.__dict__.get("_tiers", []):
            tier.dst_device = value if name == "memory" else lower
        remote = self.__dict__.get("remote")
        if remote is not None:
            remote.dst_device = lower

    def _lower_dst(self, value: str) -> str:
        """Where the disk and remote tiers put what they read: the host, unless the
        memory tier their hits fill lives on a GPU (then ``value``, for one copy)."""
        memory = self.__dict__.get("_memory")
        if memory is not None and memory._pool.device.type != "cpu":
            return value
        return "cpu"

    @property
    def local_tiers(self) -> list[tuple[str, LMCBackendInterface]]:
        return list(self._tiers)

    def tiers(self) -> list[tuple[str, LMCBackendInterface]]:
        """Every tier, fastest first, as (name, backend)."""
        out = list(self._tiers)
        if self.remote is not None:
            out.append(("remote", self.remote))
        return out

    def missing_tiers(self, key: CacheEngineKey) -> list[str]:
        """The persistent tiers (disk, remote) that lack ``key`` (the memory tier is this
        process's own; it counts only when it is the one tier); [] when all hold it.
        Thread-safe."""
        check_key(key)
        self._check_fork()
        tiers = [(name, tier) for name, tier in self.tiers() if name != "memory"] or self.tiers()
        return [name for name, tier in tiers if not tier.contains(key)]

    def describe(self) -> str:
        return " + ".join(t.describe() for _, t in self.tiers())

    # -- writes --------------------------------------------------------------------

    def put(self, key: CacheEngineKey, value: torch.Tensor, blocking: bool = True) -> None:  # type: ignore[override]
        """Store in every tier: with ``blocking``, in each before returning; without, in
        the memory tier now and in the disk tier and the remote in the background (a
        get of the key in this process reads it from the start).

        ``value`` is the seed's name for this class (the other tiers say ``kv_chunk``).
        A blocking put sends to the remote while the local tiers are written, and
        returns once the remote has the chunk, failed, or ``remote_timeout`` passed
        (a send a hung server holds past that may still read ``value``, but what it
        read after the timeout is never stored as a valid chunk). If a local
        tier raises, the remote send is waited for first, so the remote may hold
        the chunk although the call raised.
        """
        kv_chunk = value
        check_key(key)
        check_chunk(kv_chunk)
        self._check_fork()
        write = _Write()
        try:
            self._begin_write(key, write)
            self._put(key, kv_chunk, blocking)
        finally:
            write.marks.discard(write)  # first: see _Mark
            self._end(key, write)

    def _put(self, key: CacheEngineKey, kv_chunk: torch.Tensor, blocking: bool) -> None:
        stored = 0
        too_large: ValueError | None = None
        sent: Callable[[], None] | None = None  # waits for a remote put under way
        send_error: Exception | None = None
        host = self._host_copy(kv_chunk, blocking)
        if blocking and self.remote is not None:
            # The chunk goes to the remote on its I/O thread while the local tiers are
            # written here: 32 MiB took disk time plus Redis time one after the other.
            try:
                sent = self.remote.start_put(key, host if host is not None else kv_chunk)
            except ValueError:  # a bad key or chunk; checked above already, so not expected
                raise
            except Exception as exc:  # handled below, as a failed remote put
                send_error = exc
        try:
            for name, tier in self._tiers:
                try:
                    if not blocking and isinstance(tier, LMCLocalDiskBackend):
                        # Queued for the disk tier's writers: the caller waited for the
                        # disk write (16 ms of a 32 MiB put, against 3 ms for memory).
                        # They read a copy nobody writes to: the memory tier's own, just
                        # stored, else the host copy or a clone. Reads of the key wait
                        # for the write, and one that fails removes the older file.
                        tier.put_nonblocking(key, host if host is not None else self._private_copy(key, kv_chunk))
                        stored += 1
                        continue
                    on_gpu = tier is self._memory and self._memory._pool.device.type == "cuda"
                    tier.put(key, host if host is not None and not on_gpu else kv_chunk, blocking=True)
                    stored += 1
                except ValueError as exc:  # larger than this tier's budget
                    too_large = exc
                    self._forget_older(name, tier, key)
                except OSError as exc:
                    logger.warning("%s tier put of %s failed: %s", name, key, exc)
                    self.stats.incr(f"{name}_put_failures")
                    self._forget_older(name, tier, key)
        except BaseException:
            if send_error is not None:
                logger.warning("remote put of %s failed: %s", key, send_error)
                self.stats.incr("remote_put_failures")
            if sent is not None:
                # The caller may change its tensor once this returns: the send ends first
                # (or its wait times out).
                try:
                    sent()
                except Exception as exc:
                    logger.warning("remote put of %s failed: %s", key, exc)
                    self.stats.incr("remote_put_failures")
                except BaseException:
                    _abandon(sent)
                    raise
            raise
        if self.remote is not None:
            try:
                if send_error is not None:
                    raise send_error
                if sent is not None:
                    try:
                        sent()
                    except BaseException:
                        _abandon(sent)
                        raise
                else:
                    # Non-blocking: the remote's writer reads the chunk later, and the caller
                    # may reuse its buffer once this returns. The memory tier's copy is
                    # immutable to us; without one (no memory tier, a chunk over its
                    # budget) the writer gets a clone, or it would store the buffer's
                    # later bytes under this key, with a valid checksum. A host copy made
                    # here is private already.
                    private = host if host is not None else self._private_copy(key, kv_chunk)
                    self.remote.put(key, private, blocking=False)
                stored += 1
            except ValueError:
                raise
            except Exception as exc:  # remote down: local tiers still hold it
                logger.warning("remote put of %s failed: %s", key, exc)
                self.stats.incr("remote_put_failures")
                if stored == 0:
                    raise
        if stored == 0:
            if too_large is not None:
                raise too_large
            raise OSError(f"no tier could store {key}")

    def _host_copy(self, kv_chunk: torch.Tensor, blocking: bool) -> torch.Tensor | None:
        """One host copy of a GPU chunk for every tier that stores host bytes now, or None.

        The disk and remote tiers (and a memory tier in host memory) each copied a GPU
        chunk to the host themselves: a 32 MiB chunk crossed PCIe three times. The copy
        runs on the caller's stream, after the work that wrote the chunk. None when only
        a queued remote write would use it (a GPU memory tier and a remote, put without
        blocking): its writer copies the tier's slot to the host on its own thread, and
        the caller returns at once.
        """
        if not kv_chunk.is_cuda:
            return None
        gpu_memory = self._memory is not None and self._memory._pool.device.type == "cuda"
        local_needs_host = any(not (tier is self._memory and gpu_memory) for _, tier in self._tiers)
        needs_host = local_needs_host or (blocking and self.remote is not None)
        return kv_chunk.detach().cpu() if needs_host else None

    def _forget_older(self, name: str, tier: LMCBackendInterface, key: CacheEngineKey) -> None:
        """A tier that refused a put of ``key`` must not go on serving an older chunk under
        it: a get answered from it (after the faster tier's copy was evicted) was stale."""
        try:
            tier.remove(key)
        except Exception as exc:
            logger.warning("dropping the older copy of %s from the %s tier failed: %s", key, name, exc)

    # -- reads ---------------------------------------------------------------------

    def get(self, key: CacheEngineKey) -> torch.Tensor | None:
        check_key(key)
        self._check_fork()
        read: _Read | None = None
        try:
            for i, (name, tier) in enumerate(self._tiers):
                chunk = tier.get(key)
                if chunk is not None:
                    self.stats.incr(f"hits_{name}")
                    if read is not None:
                        self._fill(key, chunk, self._tiers[:i], read)
                    self._touch_below(key, i)
                    return self._to_dst(chunk)
                if read is None:
                    # After the first miss, before the slower reads: a write that ends
                    # before this is what they read (a memory hit needs no token).
                    # Named before it is registered, so the ``finally`` always finds it.
                    read = _Read()
                    self._begin_read(key, read)
            assert read is not None  # there is a local tier
            chunk = self._remote_get(key)
            if chunk is None:
                self.stats.incr("misses")
                return None
            self.stats.incr("hits_remote")
            self._fill(key, chunk, self._tiers, read)
            return self._to_dst(chunk)
        finally:
            if read is not None:
                read.marks.discard(read)  # first: see _Mark
                self._end(key, read)

    def batched_get(self, keys: Iterable[CacheEngineKey]) -> list[torch.Tensor | None]:
        keys = [check_key(k) for k in keys]
        self._check_fork()
        results: list[torch.Tensor | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        reads: dict[int, _Read] = {}  # for each key that missed the first tier (see get)
        try:
            for i, (name, tier) in enumerate(self._tiers):
                if not missing:
                    break
                got = tier.batched_get([keys[j] for j in missing])
                still: list[int] = []
                for j, chunk in zip(missing, got, strict=True):
                    if chunk is None:
                        still.append(j)
                        if j not in reads:
                            read = reads[j] = _Read()  # named first, as in get
                            self._begin_read(keys[j], read)
                    else:
                        results[j] = chunk
                        self.stats.incr(f"hits_{name}")
                        if j in reads:
                            self._fill(keys[j], chunk, self._tiers[:i], reads[j])
                        self._touch_below(keys[j], i)
                missing = still
            if missing and self.remote is not None:
                try:
                    got = list(self.remote.batched_get([keys[j] for j in missing]))
                except Exception as exc:
                    logger.warning("remote batched_get failed: %s", exc)
                    self.stats.incr("remote_errors")
                    got = [None] * len(missing)
                for j, chunk in zip(missing, got, strict=True):
                    if chunk is not None:
                        results[j] = chunk
                        self.stats.incr("hits_remote")
                        self._fill(keys[j], chunk, self._tiers, reads[j])
        finally:
            for read in reads.values():
                read.marks.discard(read)  # first: see _Mark
            for j, read in reads.items():
                self._end(keys[j], read)
        self.stats.incr("misses", sum(r is None for r in results))
        return [None if r is None else self._to_dst(r) for r in results]

    def _remote_get(self, key: CacheEngineKey) -> torch.Tensor | None:
        if self.remote is None:
            return None
        try:
            return self.remote.get(key)
        except Exception as exc:  # remotes degrade to a miss themselves; belt and braces
            logger.warning("remote get of %s failed: %s", key, exc)
            self.stats.incr("remote_errors")
            return None

    # -- fills against writes of the same key ----------------------------------------
    #
    # A fill copies what a slower tier returned; a put or remove of the key that ran
    # meanwhile makes that copy older than the faster tiers' (or brings a removed key
    # back). A write marks the reads of its key under way as stale when it begins, and
    # a read that begins while a write runs starts stale. A fill checks its read and
    # writes the tiers under the key's stripe lock, which a write takes to begin: a write
    # either cancels the fill, or begins after the fill's writes were submitted to every
    # tier and so is submitted after them (the disk tier keeps the last submitted write).

    def _stripe(self, key: CacheEngineKey) -> _KeyStripe:
        return self._stripes[hash(key) % _KEY_STRIPES]

    def _begin_write(self, key: CacheEngineKey, write: _Write) -> None:
        """Before a put or remove of ``key`` touches a tier: registers ``write`` and makes
        the key's reads under way stale. The caller ends it in a ``finally`` (see ``_Mark``)."""
        stripe = self._stripe(key)
        with stripe.lock:
            marks = stripe.writes.setdefault(key, set())
            write.marks = marks  # before it is added: no interrupt lands between (see _Mark)
            marks.add(write)
            # A snapshot (one C call): reads end by discarding their mark without the lock,
            # and a set changing size mid-iteration raises.
            for read in tuple(stripe.reads.get(key, ())):
                read.stale = True

    def _begin_read(self, key: CacheEngineKey, read: _Read) -> None:
        """Before reading ``key`` from a tier whose hit fills faster ones: registers ``read``
        (stale at once while a write runs). The caller ends it in a ``finally`` (``_Mark``)."""
        stripe = self._stripe(key)
        with stripe.lock:
            read.stale = bool(stripe.writes.get(key))
            marks = stripe.reads.setdefault(key, set())
            read.marks = marks
            marks.add(read)

    def _end(self, key: CacheEngineKey, mark: _Mark) -> None:
        """After ``mark.marks.discard(mark)``: drop its key's set from the stripe once empty."""
        marks = mark.marks
        if marks:
            return
        stripe = self._stripe(key)
        table: dict[CacheEngineKey, Any] = stripe.writes if isinstance(mark, _Write) else stripe.reads
        with stripe.lock:
            if not marks and table.get(key) is marks:
                del table[key]

    def _fill(
        self,
        key: CacheEngineKey,
        chunk: torch.Tensor,
        tiers: list[tuple[str, LMCBackendInterface]],
        read: _Read,
        *,
        handed_out: bool = True,
    ) -> bool:
        """Copy a chunk read from a slower tier into faster ones (best effort).

        Memory fills are one copy, made now; disk fills are queued for the disk's
        writers, and skipped when its write queue is full (``fills_skipped_backlog``)
        rather than holding up the get that found the chunk.

        Args:
            read: the token taken before ``chunk`` was read; a write of ``key`` since
                then cancels the fill.
            handed_out: ``chunk`` is also returned to the caller, who may modify it,
                so a queued fill gets a private copy (a memory fill copies it at once).

        Returns:
            True when every tier in ``tiers`` got the chunk; False when a write of
            ``key`` superseded the fill (nothing written) or a tier skipped it.
        """
        # A loop, not next() over a generator: an interrupt landing as that generator was
        # closed was printed as "Exception ignored" and lost (the Ctrl-C did nothing).
        disk = None
        for _, tier in tiers:
            if isinstance(tier, LMCLocalDiskBackend):
                disk = tier
                break
        disk_room = disk is not None and disk.wait_for_queue_room(chunk.numel() * chunk.element_size(), 0.0)
        if disk is not None and not disk_room:
            self.stats.incr("fills_skipped_backlog")
        private: torch.Tensor | None = None if handed_out else chunk
        if disk_room and private is None and self._memory is None:
            # A clone (no memory tier's copy to hand the disk writer), made before taking
            # the key's lock, which puts and fills of other keys in its stripe share.
            private = finished(chunk.detach().clone())  # the disk writer reads it on its own stream
        complete = disk is None or disk_room
        with self._stripe(key).lock:
            if read.stale:
                self.stats.incr("fills_superseded")
                return False
            for name, tier in tiers:
                try:
                    if tier is not disk:
                        tier.put(key, chunk, blocking=True)  # memory: one fast copy
                    elif disk_room:
                        if private is None:
                            private = self._private_copy(key, chunk)  # the memory tier's, just filled
                        if not disk.put_nonblocking(key, private, wait=False):  # room taken meanwhile
                            self.stats.incr("fills_skipped_backlog")
                            complete = False
                except (ValueError, OSError, RuntimeError) as exc:
                    logger.debug("filling %s tier with %s skipped: %s", name, key, exc)
                    complete = False
        return complete

    def _private_copy(self, key: CacheEngineKey, chunk: torch.Tensor) -> torch.Tensor:
        """A copy of ``chunk`` nobody else writes to: the memory tier's own, else a clone."""
        if self._memory is not None:
            stored = self._memory.peek(key)  # filled just before, or a hit there
            if stored is not None and stored.dtype == chunk.dtype and stored.shape == chunk.shape:
                return stored
        return finished(chunk.detach().clone())  # a writer thread reads it on its own stream

    def _touch_below(self, key: CacheEngineKey, i: int) -> None:
        # A hit in a fast tier is a use of the chunk in the slower local tiers too,
        # so their LRU order matches what callers actually read.
        for _, tier in self._tiers[i + 1 :]:
            tier.touch(key)

    def contains(self, key: CacheEngineKey) -> bool:
        check_key(key)
        self._check_fork()
        if any(tier.contains(key) for _, tier in self._tiers):
            return True
        if self.remote is None:
            return False
        try:
            return self.remote.contains(key)
        except Exception:
            self.stats.incr("remote_errors")
            return False

    def remove(self, key: CacheEngineKey) -> bool:
        """Remove ``key`` from every tier; True if any held it. Thread-safe.

        Every tier is tried; if one failed (a remote outage), the first failure is
        raised once the others are done: the chunk may still be there, and a caller
        (``lmcache evict``, ``verify --fix``) reported it removed.
        """
        check_key(key)
        self._check_fork()
        found = False
        failed: Exception | None = None
        write = _Write()
        try:
            self._begin_write(key, write)  # a fill of what was read before cannot bring it back
            for _, tier in self.tiers():
                try:
                    found = tier.remove(key) or found
                except Exception as exc:
                    logger.warning("remove of %s from %s failed: %s", key, tier.describe(), exc)
                    failed = failed or exc
        finally:
            write.marks.discard(write)  # first: see _Mark
            self._end(key, write)
        if failed is not None:
            raise failed
        return found

    def list_info(self, skip_failed: bool = True) -> list[ChunkInfo]:
        """Every tier's chunks, each key once (fastest tier's info first).

        A tier whose listing fails is logged and left out when ``skip_failed``
        (serving callers want what is reachable); otherwise it raises
        ``StoreUnavailableError`` naming the tier (the CLI: an incomplete
        listing is a failure, exit 1).
        """
        self._check_fork()
        seen: dict[CacheEngineKey, ChunkInfo] = {}
        for name, tier in self.tiers():
            try:
                infos = tier.list_info()
            except Exception as exc:
                if not skip_failed:
                    raise StoreUnavailableError(f"{name} tier", f"listing failed: {exc}") from exc
                logger.warning("listing %s failed: %s", tier.describe(), exc)
                continue
            for info in infos:
                seen.setdefault(info.key, info)
        return list(seen.values())

    def list(self) -> list[CacheEngineKey]:
        return [info.key for info in self.list_info()]

    def read_header(self, key: CacheEngineKey) -> ChunkHeader | None:
        self._check_fork()
        for _, tier in self.tiers():
            try:
                header = tier.read_header(key)
            except Exception:
                continue
            if header is not None:
                return header
        return None

    # -- prefetch ------------------------------------------------------------------

    def _prefetch(self) -> None:
        """Copy this rank's remote chunks into the local tiers, up to their capacity."""
        assert self.remote is not None
        try:
            meta = self.metadata
            if meta is None:
                logger.warning("prefetch needs engine metadata (model, rank); skipped")
                return
            # Prefetch is speculative: it copies into each tier's free room only, under that
            # tier's own budget. It copied up to the first tier's budget into every tier: a
            # disk smaller than the memory tier wrote and evicted chunk after chunk, and a
            # warm disk (the last run's cache) or chunks put since start were evicted for it.
            budgets = {"memory": self.config.memory_budget_bytes, "disk": self.config.disk_budget_bytes}
            left = {name: budgets[name] - self._used_bytes(tier) for name, tier in self._tiers}
            # Only this rank's objects are listed: a shared bucket of many models is not scanned.
            for info in self.remote.list_rank_info(meta.fmt, meta.model_name, meta.world_size, meta.worker_id):
                if self._closing.is_set():
                    return
                k = info.key
                # info.size includes the header: less it at most, a lower bound on the payload.
                if info.size is not None and info.size - 8 - MAX_HEADER_BYTES > max(left.values()):
                    continue
                # A local put or remove of k from here on cancels the copy (see _fill).
                read = _Read()
                try:
                    self._begin_read(k, read)
                    # A tier that holds k keeps its copy: it may be newer than the remote's.
                    lacking = [(name, tier) for name, tier in self._tiers if not tier.contains(k)]
                    if not lacking:
                        continue
                    chunk = self._remote_get(k)
                    if chunk is None:
                        continue
                    size = chunk.numel() * chunk.element_size()
                    cost = {name: self._stored_size(name, k, chunk) for name, _ in lacking}
                    # Room now as well: puts since start may have filled a tier (the disk's
                    # queued fills are not in its used bytes yet; ``left`` counts them).
                    fits = [
                        (name, tier)
                        for name, tier in lacking
                        if cost[name] <= min(left[name], budgets[name] - self._used_bytes(tier))
                    ]
                    if not fits:
                        continue
                    # Prefetch has no caller to hold up: it waits for room in a disk
                    # write queue that is behind (a get's fill would skip the disk).
                    if self._closing.is_set() or not self._wait_for_disk_room(fits, size):
                        return
                    if not self._fill(k, chunk, fits, read, handed_out=False):  # nobody else holds it
                        continue
                finally:
                    read.marks.discard(read)
                    self._end(k, read)
                for name, _ in fits:
                    left[name] -= cost[name]
                self.prefetched += 1
        except Exception as exc:
            logger.warning("prefetch stopped: %s", exc)
        finally:
            self._prefetch_done.set()

    @staticmethod
    def _used_bytes(tier: LMCBackendInterface) -> int:
        used = getattr(tier, "used_bytes", 0)
        return int(used)

    @staticmethod
    def _stored_size(name: str, key: CacheEngineKey, chunk: torch.Tensor) -> int:
        """Bytes ``chunk`` takes in the tier ``name``: the disk counts whole files."""
        if name == "disk":
            return chunk_file_size(chunk, key.to_string())
        return chunk.numel() * chunk.element_size()

    def _wait_for_disk_room(self, tiers: Iterable[tuple[str, LMCBackendInterface]], nbytes: int) -> bool:
        """Wait until a disk tier among ``tiers`` has room to queue ``nbytes``; False on close."""
        for _, tier in tiers:
            if isinstance(tier, LMCLocalDiskBackend):
                while not tier.wait_for_queue_room(nbytes, 0.5):
                    if self._closing.is_set():
                        return False
        return True

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop prefetch, then close every tier (each drains its queued writes). Idempotent.

        A close that was interrupted (Ctrl-C, a signal handler's exception) is finished
        by the next call: it returned at once before, leaving the tiers after the one
        interrupted never closed (their threads running, a memory tier's queue never
        drained). Each tier's own ``close`` is idempotent.
        """
        if self._closed_all:
            return
        self._check_fork()  # in a child: its own _closing (the parent's lock may be held)
        self._closing.set()
        if self._prefetch_thread is not None:
            self._prefetch_thread.join(timeout=max(5.0, 3 * self.config.remote_timeout))
        for _, tier in self.tiers():
            try:
                tier.close()
            except Exception as exc:
                logger.warning("closing %s failed: %s", tier.describe(), exc)
        self._closed_all = True
