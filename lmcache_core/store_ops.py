"""Store maintenance for tools: list, inspect, verify, evict, copy and count chunks.

UI-free logic behind the ``lmcache`` command (which only parses, prints and draws
progress). ``Store`` opens a store from a URL or a config. On a disk store the
read-only work (listing, headers, checksums, removal, temp files) goes straight
to the directory with the shared layout and chunk format: no torch import (3 s),
no index rebuild, and never the disk tier's start-up eviction, which would delete
chunks of a store larger than the default budget just because someone listed it.
Everything else goes through the backends.

Functions here are thread-safe where the backend is; ``Store`` itself is meant
for one command at a time.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import math
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, cast
from urllib.parse import urlsplit

from lmcache_core import chunk_format, layout
from lmcache_core.chunk_format import ChunkHeader
from lmcache_core.config import UNLIMITED_GB as _UNLIMITED_GB
from lmcache_core.config import LMCacheEngineConfig, mask_secrets_in, mask_url, store_kind
from lmcache_core.errors import CorruptChunkError, StoreUnavailableError
from lmcache_core.key import TOKEN_AXIS, CacheEngineKey, chunk_hashes

if TYPE_CHECKING:
    import torch

    from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface

# A store opened by a tool must never evict on open, nor to make room for what a tool
# writes (a full disk included): the budget is the serving processes' business (and
# ``lmcache evict --to-size``'s), a config file's ``max_local_disk_size`` included.
UNLIMITED_GB = _UNLIMITED_GB


@dataclass(frozen=True)
class ChunkEntry:
    """A chunk as a listing sees it: key, stored size and times (None when unknown).

    ``identity``: on a disk store, the listed file's ``file_identity``, so that
    ``run_evict`` removes only that file, not one a writer put at its path since.
    """

    key: CacheEngineKey
    size: int | None = None
    mtime: float | None = None
    atime: float | None = None
    identity: FileIdentity | None = field(default=None, compare=False, repr=False)

    @property
    def last_used(self) -> float | None:
        """Last write or read (POSIX seconds); LRU order and ``--older-than`` use it."""
        times = [t for t in (self.mtime, self.atime) if t is not None]
        return max(times) if times else None

    def to_dict(self, now: float) -> dict[str, Any]:
        used = self.last_used
        return {
            "key": self.key.to_string(),
            "fmt": self.key.fmt,
            "model": self.key.model_name,
            "world_size": self.key.world_size,
            "worker_id": self.key.worker_id,
            "chunk_hash": self.key.chunk_hash,
            "size": self.size,
            "mtime": self.mtime,
            "age_s": None if used is None else max(0.0, now - used),
        }


@dataclass(frozen=True)
class TempFile:
    """A temp file left in a disk store (a writer's, possibly dead)."""

    path: str
    size: int
    mtime: float
    stale: bool  # its writer is gone (or it is older than any write takes)


# A file as ``verify --fix`` recognises it: (st_dev, st_ino, st_size, st_mtime_ns).
FileIdentity = tuple[int, int, int, int]


def file_identity(st: os.stat_result) -> FileIdentity:
    """The identity of a file from its stat: another file, or this one rewritten, differs."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# What a check of one chunk found (``ChunkCheck.status``).
OK = "ok"
CORRUPT = "corrupt"  # read in full and confirmed bad: the only status ``verify --fix`` removes
MISSING = "missing"  # not there (removed meanwhile, or never stored)
UNVERIFIED = "unverified"  # could not be read (timeout, remote down, permission): never removed
MISMATCHED = "mismatched"  # a sound chunk that cannot extend a prompt's prefix (``read_prefix``)


@dataclass(frozen=True)
class ChunkCheck:
    """Result of reading one chunk in full.

    ``status`` defaults to ``ok`` or ``corrupt`` from ``ok``; checks that could not
    tell (``missing``, ``unverified``) say so explicitly.
    """

    key: CacheEngineKey | None
    where: str  # key string, or the file path for unparseable names
    ok: bool
    reason: str = ""
    header: ChunkHeader | None = None
    status: str = ""
    # The checked file's (st_dev, st_ino, st_size, st_mtime_ns), taken from the very
    # file read: ``verify --fix`` removes it only while the path still holds it.
    identity: FileIdentity | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", OK if self.ok else CORRUPT)


@dataclass(frozen=True)
class ForeignFile:
    """A file named like a chunk that is not at a chunk path (model weights, say): never touched."""

    path: str
    reason: str


class Store:
    """A store opened for inspection and maintenance.

    Args:
        url: a store URL (any ``open_backend`` takes), or None with ``config``.
        config: the effective configuration; with ``url=None`` it describes the
            store (memory/disk/remote tiers, ``CreateStorageBackend``).
    """

    def __init__(self, url: str | None = None, config: LMCacheEngineConfig | None = None) -> None:
        if url is None and config is None:
            raise ValueError("a store needs a URL or a config")
        self.url = url
        self.config = config or LMCacheEngineConfig()
        self._backend: LMCBackendInterface | None = None
        self._lock = threading.Lock()
        if url is not None:
            self.kind = store_kind(url)
            path = url[len("file://") :] if url.startswith("file://") else url
            self.root: str | None = (
                os.path.abspath(os.path.expanduser(path)) if self.kind == "disk" else None
            )
        else:
            self.config = _tool_config(self.config)
            self.kind, self.root = _config_kind(self.config)
        if self.root is not None and os.path.exists(self.root) and not os.path.isdir(self.root):
            # Listing it would find "0 chunks" and succeed; writing would fail obscurely.
            raise NotADirectoryError(errno.ENOTDIR, "a disk store must be a directory", self.root)

    # -- identity ------------------------------------------------------------------

    def describe(self) -> str:
        """Where the store is, safe to print."""
        if self.root is not None:
            return f"disk {self.root}"
        if self.kind == "memory" and self.url is not None:
            return f"memory ({urlsplit(self.url).scheme})"
        if self.url is not None:
            return mask_url(self.url)
        parts = []
        cfg = self.config
        if cfg.local_memory_device:
            parts.append(f"memory ({cfg.local_memory_device})")
        if cfg.disk_path:
            parts.append(f"disk {cfg.disk_path}")
        if cfg.remote_url:
            parts.append(mask_url(cfg.remote_url))
        return " + ".join(parts)

    def same_place(self, other: Store) -> bool:
        """Whether both stores name the same place, compared unmasked: two URLs that
        differ only in a part ``describe`` hides (an Azure connection string's
        account, a password) are different stores."""

        def place(store: Store) -> tuple[str | None, ...]:
            if store.root is not None:
                return ("disk", store.root)
            if store.url is not None:
                return ("url", store.url.strip())
            cfg = store.config
            return ("config", cfg.local_memory_device, cfg.disk_path, (cfg.remote_url or "").strip() or None)

        return place(self) == place(other)

    @property
    def is_disk(self) -> bool:
        return self.root is not None

    @property
    def backend(self) -> LMCBackendInterface:
        """The backend (opened on first use; imports torch)."""
        with self._lock:
            if self._backend is None:
                self._backend = self._open()
            return self._backend

    def _open(self) -> LMCBackendInterface:
        """The backend, opened so that opening changes nothing in the store.

        No disk budget, whatever the config says: the disk tier's index rebuild
        evicts down to its budget, which deleted chunks of a directory holding more
        than a config's ``max_local_disk_size`` (several servers share it, or
        ``warm`` filled it) when ``ls`` merely listed it. With no budget, a tool's
        writes (``put``, ``warm --to``) evict nothing either: they add chunks, and
        the serving processes (each over the chunks it knows) or
        ``lmcache evict --to-size`` keep the budget. No prefetch: it copies remote
        chunks into the local tiers, a write no command asked for.
        """
        from lmcache_core.storage_backend import CreateStorageBackend, open_backend

        cfg = self.config.replace(
            _source="lmcache tool (never evicts, never prefetches)", max_local_disk_size=UNLIMITED_GB, prefetch=False
        )
        if self.url is not None:
            return open_backend(self.url, dst_device="cpu", config=cfg)
        from lmcache_core.config import LMCacheEngineMetadata

        meta = LMCacheEngineMetadata(model_name="lmcache-tool")
        return CreateStorageBackend(cfg, meta, dst_device="cpu")

    def close(self) -> None:
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listing -------------------------------------------------------------------

    def entries(self) -> list[ChunkEntry]:
        """Every chunk with size and times where the medium knows them."""
        if self.root is not None:
            return [
                ChunkEntry(key, st.st_size, st.st_mtime, st.st_atime, identity=file_identity(st))
                for _, st, key in layout.scan_store(self.root)
                if key is not None
            ]
        backend = self.backend
        from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend  # torch: already loaded

        if isinstance(backend, LMCHybridBackend):  # a tier that cannot list is a failed listing here
            infos: Iterable[Any] = backend.list_info(skip_failed=False)
        else:  # (cast: the backend's ``list`` method shadows the builtin in its annotations)
            infos = cast("Iterable[Any]", backend.list_info())
        return [ChunkEntry(i.key, i.size, i.mtime, i.atime) for i in infos]

    def path_of(self, key: CacheEngineKey) -> str | None:
        """The chunk's file on a disk store, else None."""
        if self.root is None:
            return None
        return layout.disk_path(self.root, key)

    def contains(self, key: CacheEngineKey) -> bool:
        path = self.path_of(key)
        if path is not None:
            return os.path.isfile(path)
        return self.backend.contains(key)

    def header(self, key: CacheEngineKey) -> ChunkHeader | None:
        """The chunk's header without its payload; None when absent or unreadable.

        Raises:
            StoreUnavailableError: no tier holding a header answered (a remote's
                outage is not a bad chunk).
        """
        path = self.path_of(key)
        if path is None:
            unavailable: StoreUnavailableError | None = None
            for _, tier in self.tiers() or [("", self.backend)]:
                fetch = getattr(tier, "fetch_header", None)  # remote tiers: raises on an outage
                try:
                    header = fetch(key) if fetch is not None else tier.read_header(key)
                except StoreUnavailableError as exc:
                    unavailable = exc
                    continue
                if header is not None:
                    return cast(ChunkHeader, header)
            if unavailable is not None:
                raise unavailable
            return None
        return _file_header(path)

    # -- reading in full -----------------------------------------------------------

    def check(self, key: CacheEngineKey) -> ChunkCheck:
        """Read the whole chunk and check header, key and checksum.

        ``status`` tells a confirmed corrupt chunk from one that is missing or
        could not be read (a remote timeout or outage is ``unverified``, never ``corrupt``).
        """
        path = self.path_of(key)
        if path is not None:
            return check_file(path, key)
        where = key.to_string()
        try:
            buf = self._fetch(key)
        except StoreUnavailableError as exc:
            return ChunkCheck(key, where, False, f"not verified: {exc}", status=UNVERIFIED)
        except OSError as exc:  # a disk tier's file (never a timeout: those are the above)
            return _unreadable(key, where, exc)
        if buf is None:
            return ChunkCheck(key, where, False, "not found", status=MISSING)
        if isinstance(buf, _Decoded):  # a tier that holds tensors, not bytes (memory)
            return ChunkCheck(key, where, True, header=_header_of(buf.chunk, key))
        if isinstance(buf, _FromDisk):
            return check_bytes(buf.data, key, where, unkeyed_ok=True)
        return check_bytes(buf, key, where)

    def read(self, key: CacheEngineKey) -> tuple[torch.Tensor | None, ChunkCheck]:
        """The chunk's tensor and its check; a chunk that fails its checksum is still
        decoded (when its header is sound) so it can be inspected.

        Raises:
            StoreUnavailableError: a remote store did not answer (not a miss, not corruption).
        """
        path = self.path_of(key)
        where = key.to_string()
        if path is None:
            fetched = self._fetch(key)
            if fetched is None:
                return None, ChunkCheck(key, where, False, "not found", status=MISSING)
            if isinstance(fetched, _Decoded):
                return fetched.chunk, ChunkCheck(key, where, True, header=_header_of(fetched.chunk, key))
            from_disk = isinstance(fetched, _FromDisk)
            buf = _writable(fetched.data if from_disk else fetched)  # the decoded tensor aliases it
        else:
            from_disk = False
            try:
                with open_chunk_file(path) as f:
                    buf = _read_whole(f)
            except FileNotFoundError:
                return None, ChunkCheck(key, where, False, "not found", status=MISSING)
            except OSError as exc:
                return None, _unreadable(key, where, exc)
        result = check_bytes(buf, key, where, unkeyed_ok=path is not None or from_disk)
        if result.header is None:
            return None, result
        # Over the header already parsed and validated (shape x dtype = payload, sizes
        # add up), not ``decode``: that re-checks identity and raised on a foreign file
        # (a plain safetensors one), which must be a failed check like a bad checksum.
        return chunk_format.tensor_over(buf, result.header), result

    def read_verified(self, key: CacheEngineKey, *, helper: Any = None) -> tuple[torch.Tensor | None, ChunkCheck]:
        """The chunk's tensor when it passed its check (else None), and the check.

        The read for tools that *use* chunks (``get --tokens``, ``warm``'s source):
        like ``read``, it leaves the store as it was. A chunk that fails is reported
        in the check, never deleted (``verify --fix`` is the one command that
        removes chunks); a disk chunk's atime is kept, so ``evict --older-than``
        and ``--to-size`` still see its real last use; no index, no read-through
        fill of a faster tier. A disk chunk is read and hashed in one pass, as the
        disk tier's ``get`` does, rather than read whole and then hashed.

        On a tiered store each tier's copy is checked in turn, fastest first: a bad
        copy (left in place) falls through to the next tier, as the backend's ``get``
        does, and the check reports a bad copy only when no tier holds a good one.

        Args:
            helper: passed to ``read_file_verified`` (``chunk_format.ALONE`` for
                callers that read several chunks side by side).

        Raises:
            StoreUnavailableError: a remote store did not answer (not a miss, not corruption).
        """
        path = self.path_of(key)
        if path is not None:
            return read_file_verified(path, key, helper=helper)
        tiers = self.tiers()
        if tiers is None:
            chunk, check = self.read(key)
            return (chunk if check.ok else None), check
        where = key.to_string()
        bad: ChunkCheck | None = None  # the first bad copy, reported when no tier has a good one
        for name, tier in tiers:
            if name == "disk":
                chunk, check = read_file_verified(layout.disk_path(tier.root, key), key, helper=helper)
                if check.status == MISSING:
                    continue
            else:
                try:
                    found = _fetch_tier(name, tier, key)
                except StoreUnavailableError as exc:
                    if bad is None:
                        raise
                    # The copy found is bad and the rest could not be asked: report the bad one.
                    return None, dataclasses.replace(bad, reason=f"{bad.reason} (and the {name} tier did not answer: {exc})")
                if found is None:
                    continue
                if isinstance(found, _Decoded):  # a tier that holds tensors, not bytes (memory)
                    return found.chunk, ChunkCheck(key, where, True, header=_header_of(found.chunk, key))
                buf = _writable(found)
                check = check_bytes(buf, key, where)
                chunk = chunk_format.decode(buf, verify=False) if check.ok else None
            if check.ok:
                return chunk, check
            bad = bad or check
        return None, bad or ChunkCheck(key, where, False, "not found", status=MISSING)

    def tiers(self) -> list[tuple[str, Any]] | None:
        """A tiered store's tiers as (name, backend), fastest first
        (``LMCHybridBackend.tiers``); None for a single-tier store."""
        backend = self.backend
        from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend  # torch: loaded by backend

        return list(backend.tiers()) if isinstance(backend, LMCHybridBackend) else None

    def _fetch(self, key: CacheEngineKey) -> Any:
        """A non-disk chunk's raw bytes (None when absent), or ``_Decoded`` for a tier
        that holds tensors. Raw bytes so the caller can tell corruption from absence;
        through the remote's own timeout so an outage raises instead of reading as a miss.

        Raises:
            StoreUnavailableError: the remote did not answer.
        """
        from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend  # torch: loaded by backend

        backend = self.backend
        if isinstance(backend, LMCRemoteBackend):
            return backend.fetch_bytes(key)
        tiers = self.tiers()
        if tiers is not None:
            # Tier by tier, without the read-through fill that ``get`` does: a
            # read-only command must not write the chunk into local tiers.
            for name, tier in tiers:
                found = _fetch_tier(name, tier, key)
                if found is not None:
                    return found
            return None
        chunk = backend.get(key)
        return None if chunk is None else _Decoded(chunk)

    def remove(self, key: CacheEngineKey) -> bool:
        path = self.path_of(key)
        if path is None:
            return self.backend.remove(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    # -- disk housekeeping ---------------------------------------------------------

    def temp_files(self, now: float | None = None) -> list[TempFile]:
        """Temp files in a disk store (empty for other stores)."""
        if self.root is None:
            return []
        now = time.time() if now is None else now
        out = []
        for path, st, _ in layout.scan_store(self.root):
            name = os.path.basename(path)
            if layout.is_temp_name(name):
                out.append(TempFile(path, st.st_size, st.st_mtime, layout.is_stale_temp(name, st.st_mtime, now)))
        return out


def _tool_config(cfg: LMCacheEngineConfig) -> LMCacheEngineConfig:
    """The tiers a tool sees of a config's store: all but a memory tier in front of others.

    A serving process's memory tier is its own RAM, out of any other process's
    reach: the tool's would start empty, answer "0 cached" for every prompt, and
    fill gigabytes of the tool's RAM on ``warm --to`` for nothing. A memory-only
    config keeps its tier (a process-local store, as the user asked).
    """
    if cfg.local_memory_device is not None and (cfg.disk_path or cfg.remote_url):
        return cfg.replace(_source="lmcache tool (a server's memory tier is its own)", local_device=None)
    return cfg


def _config_kind(cfg: LMCacheEngineConfig) -> tuple[str, str | None]:
    memory, disk, remote = cfg.local_memory_device is not None, cfg.disk_path, cfg.remote_url
    if disk and not memory and not remote:
        return "disk", os.path.abspath(os.path.expanduser(disk))
    if memory and not disk and not remote:
        return "memory", None
    if remote and not memory and not disk:
        return "remote", None
    return "tiered", None


def _header_of(chunk: torch.Tensor, key: CacheEngineKey) -> ChunkHeader:
    cpu = chunk.detach().cpu().contiguous()
    return chunk_format.parse_header(chunk_format.encode_header(cpu, key.to_string()))


class NotRegularFileError(OSError):
    """A FIFO, device, socket (or a link to one) where a chunk file should be.

    ``identity``: that file's (``file_identity``), from the descriptor that found it.
    """

    identity: FileIdentity | None = None


# Linux only; elsewhere 0 (a plain open).
_O_NOATIME = getattr(os, "O_NOATIME", 0)


def open_chunk_file(path: str, *, buffering: int = -1) -> Any:
    """Open a chunk file for reading; only regular files (``disk_io.open_read``'s rule).

    ``O_NONBLOCK``: a FIFO planted at a chunk path would otherwise block ``open``
    forever and hang ``show``/``get``/``verify``. ``O_NOATIME``: looking at a chunk
    is not using it; a read that bumped its atime would make ``evict --older-than``
    and LRU ``--to-size`` spare chunks nobody uses. The kernel allows it only to the
    file's owner (EPERM otherwise), so a plain open follows then.

    Args:
        buffering: as ``open``'s (0: a raw file, which reads at offsets with ``preadv``).

    Raises:
        NotRegularFileError: a FIFO, device or socket (``EINVAL``).
        OSError: the usual errors otherwise.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | _O_NOATIME)
    except PermissionError as exc:
        if not _O_NOATIME or exc.errno != errno.EPERM:
            raise
        fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            err = NotRegularFileError(errno.EINVAL, "not a regular file", path)
            err.identity = file_identity(st)
            raise err
        return open(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _unreadable(key: CacheEngineKey | None, where: str, exc: OSError) -> ChunkCheck:
    """The check of a chunk file that could not be read: a non-file at a chunk path
    is no chunk (corrupt); any other error (permission, I/O) leaves it unverified."""
    status = CORRUPT if isinstance(exc, NotRegularFileError) else UNVERIFIED
    return ChunkCheck(key, where, False, f"unreadable: {exc.strerror or exc}", status=status)


@dataclass(frozen=True)
class _Decoded:
    """A chunk from a tier that holds tensors rather than bytes (memory)."""

    chunk: Any


@dataclass(frozen=True)
class _FromDisk:
    """A disk tier's chunk file bytes: checked as the disk tier reads them (an empty
    key at the key's path is that key's), where a remote's objects are not."""

    data: Any


def _fetch_tier(name: str, tier: Any, key: CacheEngineKey) -> Any:
    """One tier's copy of a chunk for ``Store._fetch``: raw bytes (a remote's object,
    a disk tier's file), ``_Decoded`` for a tier that holds tensors, None when absent.
    No read-through fill, no index, atime kept.

    Raises:
        StoreUnavailableError: a remote tier did not answer.
        OSError: a disk tier's file could not be read.
    """
    from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend  # torch: loaded by backend

    if isinstance(tier, LMCRemoteBackend):
        return tier.fetch_bytes(key)
    if name == "disk":
        data = _read_tier_file(tier, key)
        return None if data is None else _FromDisk(data)
    chunk = tier.get(key)
    return None if chunk is None else _Decoded(chunk)


def _writable(buf: Any) -> Any:
    """``buf`` itself when it is writable memory (a ``bytearray``, or a writable
    ``memoryview`` over a connector's pool buffer), else a writable copy: a tensor
    decoded over read-only ``bytes`` makes ``torch.frombuffer`` warn."""
    if isinstance(buf, (bytearray, memoryview)) and not memoryview(buf).readonly:
        return buf
    return bytearray(buf)


def _read_tier_file(tier: Any, key: CacheEngineKey) -> bytearray | None:
    """A disk tier's chunk file, read directly (no index, no fill, atime kept); None when absent."""
    try:
        with open_chunk_file(layout.disk_path(tier.root, key)) as f:
            return _read_whole(f)
    except FileNotFoundError:
        return None


def _read_whole(f: Any) -> bytearray:
    """An open file's bytes, read straight into writable memory: the tensor decoded
    over them needs it, and ``bytearray(f.read())`` copied a 32 MiB chunk twice."""
    buf = bytearray(os.fstat(f.fileno()).st_size)
    n = f.readinto(buf)  # a buffered reader fills it, short only at end of file
    del buf[n:]
    return buf


def check_bytes(buf: Any, key: CacheEngineKey | None, where: str, *, unkeyed_ok: bool = False) -> ChunkCheck:
    """Check a whole chunk held in memory: header, identity, checksum.

    ``unkeyed_ok``: a chunk with an empty key passes as ``key``'s, as the disk tier
    reads one at a key's path (the seed's ``save_disk(path, kv_chunk)`` wrote such
    files): what the backend serves, ``verify --fix`` must not remove.
    """
    mv = memoryview(buf).cast("B")
    try:
        header = chunk_format.parse_header(mv[: 8 + chunk_format.MAX_HEADER_BYTES], total_size=len(mv))
    except CorruptChunkError as exc:
        return ChunkCheck(key, where, False, f"bad header: {exc.reason}")
    try:
        expected = None if key is None or (unkeyed_ok and header.key == "") else key.to_string()
        chunk_format.check_identity(header, expected)
        chunk_format.verify_payload(header, mv[header.data_offset :])
    except CorruptChunkError as exc:
        return ChunkCheck(key, where, False, exc.reason, header)
    return ChunkCheck(key, where, True, header=header)


def check_file(path: str, key: CacheEngineKey | None) -> ChunkCheck:
    """Read a chunk file in full and check it."""
    where = key.to_string() if key is not None else path
    try:
        with open_chunk_file(path) as f:
            identity = file_identity(os.fstat(f.fileno()))  # of the bytes judged, not of the path later
            buf = f.read()
    except FileNotFoundError:
        return ChunkCheck(key, where, False, "not found", status=MISSING)
    except OSError as exc:
        check = _unreadable(key, where, exc)
        if isinstance(exc, NotRegularFileError):
            check = dataclasses.replace(check, identity=exc.identity)
        return check
    return dataclasses.replace(check_bytes(buf, key, where, unkeyed_ok=True), identity=identity)


def _read_buffers() -> Any:
    """Warm buffers for ``read_file_verified`` (``warm`` reads chunk after chunk; a fresh
    32 MiB allocation page-faults at a fraction of the speed of reusing one). A buffer
    is reused only once no tensor over it is left."""
    from lmcache_core.storage_backend.mem_pool import READ_POOL_BYTES, shared_pool

    return shared_pool("lmcache-tool-reads", READ_POOL_BYTES)


def read_file_verified(
    path: str, key: CacheEngineKey, *, helper: Any = None
) -> tuple[torch.Tensor | None, ChunkCheck]:
    """A chunk file's tensor when header, key and checksum pass (else None), and the check.

    Read-only: a bad file stays where it is (for ``verify`` to report and ``--fix``
    to remove), and its atime is kept (``open_chunk_file``). Header and key are
    checked before the payload is allocated; the payload is hashed as it lands
    (``chunk_format.read_payload_verified``).

    Args:
        helper: passed to ``chunk_format.read_payload_verified``: None shares a large
            read with the process's checksum helper; ``chunk_format.ALONE`` reads and
            hashes on this thread only (for callers reading several chunks at once,
            where each splitting with the helper measured slower than each alone).
    """
    import torch

    where = key.to_string()
    header: ChunkHeader | None = None
    try:
        with open_chunk_file(path, buffering=0) as f:
            header = chunk_format.read_header(f, total_size=os.fstat(f.fileno()).st_size)
            chunk_format.check_identity(header, None if header.key == "" else where)  # as the disk tier reads
            if not header.nbytes:
                return torch.empty(header.shape, dtype=header.torch_dtype), ChunkCheck(key, where, True, header=header)
            buf = _read_buffers().acquire(header.nbytes)
            chunk_format.read_payload_verified(f, header, buf, helper=helper)
    except FileNotFoundError:
        return None, ChunkCheck(key, where, False, "not found", status=MISSING)
    except CorruptChunkError as exc:
        reason = exc.reason if header is not None else f"bad header: {exc.reason}"
        return None, ChunkCheck(key, where, False, reason, header)
    except OSError as exc:
        return None, _unreadable(key, where, exc)
    chunk = buf.view(header.torch_dtype).view(header.shape)
    return chunk, ChunkCheck(key, where, True, header=header)


@contextmanager
def worker_pool(jobs: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for per-chunk work that stop early when the caller does.

    A plain ``with ThreadPoolExecutor()`` runs every queued task before it lets an
    exception through: after Ctrl-C, ``warm`` to a dead remote went on for 10 s.
    Here an exception drops the tasks not started and waits for those in flight
    (each bounded by its store's timeout), so none writes into a store the caller
    then closes; on ``KeyboardInterrupt`` it does not wait (the user asked to stop;
    the CLI then exits without joining them, and what they abandon is safe).
    """
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        yield pool
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# -- selection -----------------------------------------------------------------------


def check_pattern(pattern: str | None) -> None:
    """Raise ``ValueError`` for an empty or blank pattern: it is an unset variable far
    more often than a wish for every chunk (``'*'`` says that)."""
    if pattern is not None and not pattern.strip():
        raise ValueError("PATTERN is empty; pass '*' to mean every chunk")


def match_key(key: CacheEngineKey, pattern: str | None) -> bool:
    """Glob match on the key string; a pattern without ``*?[`` matches as a substring.

    None matches every key; an empty or blank pattern is a ``ValueError`` (``check_pattern``).
    """
    if pattern is None:
        return True
    check_pattern(pattern)
    text = key.to_string()
    if not any(c in pattern for c in "*?["):
        return pattern in text
    return fnmatch.fnmatchcase(text, pattern)


def select(
    entries: Iterable[ChunkEntry],
    *,
    pattern: str | None = None,
    model: str | None = None,
    fmt: str | None = None,
    larger_than: int | None = None,
    older_than: float | None = None,
    now: float | None = None,
) -> list[ChunkEntry]:
    """Entries matching every given filter (``older_than`` in seconds since last use).

    Raises:
        ValueError: an empty or blank ``pattern`` (``check_pattern``).
    """
    check_pattern(pattern)
    now = time.time() if now is None else now
    out = []
    for e in entries:
        if model is not None and e.key.model_name != model:
            continue
        if fmt is not None and e.key.fmt != fmt:
            continue
        if larger_than is not None and (e.size is None or e.size <= larger_than):
            continue
        if older_than is not None:
            used = e.last_used
            if used is None or now - used < older_than:
                continue
        if not match_key(e.key, pattern):
            continue
        out.append(e)
    return out


SORTS = ("name", "size", "age")


def sort_entries(entries: list[ChunkEntry], by: str) -> list[ChunkEntry]:
    """``name`` ascending, ``size`` largest first, ``age`` least recently used first."""
    if by == "name":
        return sorted(entries, key=lambda e: e.key.to_string())
    if by == "size":
        return sorted(entries, key=lambda e: (-(e.size or 0), e.key.to_string()))
    if by == "age":
        return sorted(entries, key=lambda e: (e.last_used or 0.0, e.key.to_string()))
    raise ValueError(f"sort: {by!r} is not one of {', '.join(SORTS)}")


# -- statistics ------------------------------------------------------------------------


def store_stats(entries: Sequence[ChunkEntry]) -> dict[str, Any]:
    """Counts and bytes in total, per model and per fmt; oldest and newest write."""

    def group(name_of: Callable[[ChunkEntry], str]) -> list[dict[str, Any]]:
        acc: dict[str, list[int]] = {}
        for e in entries:
            a = acc.setdefault(name_of(e), [0, 0])
            a[0] += 1
            a[1] += e.size or 0
        return [{"name": k, "chunks": v[0], "bytes": v[1]} for k, v in sorted(acc.items())]

    mtimes = [e.mtime for e in entries if e.mtime is not None]
    return {
        "chunks": len(entries),
        "bytes": sum(e.size or 0 for e in entries),
        "oldest": min(mtimes) if mtimes else None,
        "newest": max(mtimes) if mtimes else None,
        "models": group(lambda e: e.key.model_name),
        "fmts": group(lambda e: e.key.fmt),
    }


# -- eviction --------------------------------------------------------------------------


@dataclass(frozen=True)
class EvictPlan:
    """Which chunks to remove and what that frees."""

    victims: list[ChunkEntry]
    freed: int
    before: int  # store bytes now
    after: int  # store bytes once the plan ran

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "chunks": len(self.victims),
            "bytes_freed": self.freed,
            "bytes_before": self.before,
            "bytes_after": self.after,
            "victims": [v.to_dict(now) for v in self.victims],
        }


def plan_evict(
    entries: Sequence[ChunkEntry],
    *,
    pattern: str | None = None,
    model: str | None = None,
    older_than: float | None = None,
    to_size: int | None = None,
    now: float | None = None,
) -> EvictPlan:
    """Chunks matching the filters; with ``to_size``, only as many of them, least
    recently used first, as bring the whole store down to ``to_size`` bytes."""
    total = sum(e.size or 0 for e in entries)
    candidates = select(entries, pattern=pattern, model=model, older_than=older_than, now=now)
    if to_size is not None:
        victims: list[ChunkEntry] = []
        remaining = total
        for e in sort_entries(candidates, "age"):
            if remaining <= to_size:
                break
            victims.append(e)
            remaining -= e.size or 0
    else:
        victims = sort_entries(candidates, "age")
    freed = sum(v.size or 0 for v in victims)
    return EvictPlan(victims, freed, total, total - freed)


@dataclass
class EvictResult:
    """What ``run_evict`` did. ``left_alone``: chunks whose file changed since the plan
    (a writer put a new copy there, or a reader used it): kept, neither removed nor freed."""

    removed: int = 0
    freed: int = 0
    left_alone: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def run_evict(store: Store, plan: EvictPlan, progress: Callable[[int], None] | None = None) -> EvictResult:
    """Remove the plan's chunks, calling ``progress(bytes_freed)`` after each.

    On a disk store a chunk's file is removed only while its path still holds the
    file the plan listed (``ChunkEntry.identity``) and nobody read it since (its
    atime): a serving process that wrote or served the chunk since (the
    confirmation prompt may wait minutes) has just used it, and it stays
    (``left_alone``). A chunk already gone counts as neither removed nor failed.
    Other stores (a remote object has no such identity, and no conditional delete
    that every connector shares) remove by key.
    """
    result = EvictResult()
    for v in plan.victims:
        freed = 0
        try:
            path = store.path_of(v.key)
            if path is not None and v.identity is not None:
                outcome = _unlink_unchanged(path, v.identity, used_at=v.atime)
                if outcome == _CHANGED:
                    result.left_alone.append(v.key.to_string())
                removed = outcome == _REMOVED
            else:
                removed = store.remove(v.key)
            if removed:
                freed = v.size or 0
                result.removed += 1
                result.freed += freed
        except Exception as exc:  # one bad chunk must not stop the rest
            result.failures.append(f"{v.key}: {exc}")
        if progress is not None:
            progress(freed)
    return result


# -- verification ----------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``verify_store`` found (and fixed).

    ``bad`` chunks were read in full and failed (what ``--fix`` removes);
    ``unverified`` ones could not be read (remote timeout, permission): a problem
    left, never removed; ``foreign`` files are named like chunks but lie outside
    the store's layout (model weights, say): reported, never a problem, never removed.
    ``left_alone`` are bad chunks whose file was replaced between the check and the
    fix (a writer's new copy, unchecked): kept, and no longer a problem, since the
    file found bad is gone.
    """

    checked: int = 0
    ok: int = 0
    bad: list[ChunkCheck] = field(default_factory=list)
    unverified: list[ChunkCheck] = field(default_factory=list)
    foreign: list[ForeignFile] = field(default_factory=list)
    temps: list[TempFile] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # what --fix removed
    left_alone: list[str] = field(default_factory=list)  # bad when checked, replaced before --fix
    fix_failures: list[str] = field(default_factory=list)

    @property
    def remaining_problems(self) -> int:
        fixed = set(self.removed) | set(self.left_alone)
        bad_left = [b for b in self.bad if _problem_id(b) not in fixed]
        temps_left = [t for t in self.temps if t.stale and t.path not in fixed]
        return len(bad_left) + len(self.unverified) + len(temps_left)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "ok": self.ok,
            "bad": [{"chunk": b.where, "reason": b.reason} for b in self.bad],
            "unverified": [{"chunk": u.where, "reason": u.reason} for u in self.unverified],
            "foreign": [{"path": f.path, "reason": f.reason} for f in self.foreign],
            "temp_files": [
                {"path": t.path, "size": t.size, "stale": t.stale} for t in self.temps
            ],
            "removed": self.removed,
            "left_alone": self.left_alone,
            "fix_failures": self.fix_failures,
            "problems_left": self.remaining_problems,
        }

    def merge(self, other: VerifyReport, tier: str) -> None:
        """Add a tier's report, its chunks named ``<tier>: <chunk>``."""
        self.checked += other.checked
        self.ok += other.ok
        self.bad += [dataclasses.replace(b, where=f"{tier}: {b.where}") for b in other.bad]
        self.unverified += [dataclasses.replace(u, where=f"{tier}: {u.where}") for u in other.unverified]
        self.foreign += other.foreign
        self.temps += other.temps
        temp_paths = {t.path for t in other.temps}
        self.removed += [r if r in temp_paths else f"{tier}: {r}" for r in other.removed]
        self.left_alone += [f"{tier}: {r}" for r in other.left_alone]
        self.fix_failures += [f"{tier}: {f}" for f in other.fix_failures]


def _problem_id(check: ChunkCheck) -> str:
    return check.where


def _key_at(root: str, path: str) -> CacheEngineKey | None:
    """The key whose chunk path ``path`` is, or None when it is no chunk path."""
    try:
        return layout.path_to_key(os.path.relpath(path, root).replace(os.sep, "/"))
    except ValueError:
        return None


def verify_store(
    store: Store,
    *,
    fix: bool = False,
    jobs: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read every chunk and check header, key and checksum; find stray temp files.

    A store described by a config is checked tier by tier (the disk tier's files,
    the remote's objects), so a bad copy in one tier is not hidden by a good one in
    another, and nothing is read through into a faster tier. The memory tier
    belongs to the process that filled it: nothing to check from a tool.

    Args:
        fix: remove chunks that failed their check and stale temp files (a live
            writer's temp file stays; chunks that could not be read and files
            outside the store's layout are never removed).
        jobs: chunks checked in parallel (checksums release the GIL on large buffers).
        progress: called with (chunks checked, bytes checked) as work completes.
    """
    if store.url is None and store.kind == "tiered":
        return _verify_tiers(store, fix=fix, jobs=jobs, progress=progress)
    report = VerifyReport()
    targets: list[tuple[CacheEngineKey, str | None, int]] = []
    special: list[ChunkCheck] = []
    if store.root is not None:
        for path, st, key in layout.scan_store(store.root, special=True):
            if not layout.is_chunk_name(os.path.basename(path)):
                continue  # temp files (below) and whatever else lives there
            if stat.S_ISREG(st.st_mode):
                if key is not None:
                    targets.append((key, path, st.st_size))
                else:
                    report.foreign.append(ForeignFile(path, "named like a chunk but not at a chunk path"))
                continue
            at = _key_at(store.root, path)
            if at is None:
                report.foreign.append(ForeignFile(path, "not a regular file, not at a chunk path"))
            else:  # squats a chunk's path: no chunk can be stored there
                reason = "not a regular file (FIFO, device, socket or link)"
                special.append(ChunkCheck(at, path, False, reason, identity=file_identity(st)))
        report.temps = store.temp_files()
    else:
        targets = [(e.key, None, e.size or 0) for e in store.entries()]

    def one(target: tuple[CacheEngineKey, str | None, int]) -> ChunkCheck:
        key, path, _ = target
        return check_file(path, key) if path is not None else store.check(key)

    done_bytes = 0
    with worker_pool(jobs) as pool:
        futures = {pool.submit(one, t): t for t in targets}
        for fut in as_completed(futures):
            result = fut.result()
            done_bytes += futures[fut][2]
            if result.status == OK:
                report.checked += 1
                report.ok += 1
            elif result.status == CORRUPT:
                report.checked += 1
                report.bad.append(result)
            elif result.status == UNVERIFIED:
                report.checked += 1
                report.unverified.append(result)
            # MISSING: removed by someone else meanwhile; nothing to check
            if progress is not None:
                progress(report.checked, done_bytes)
    report.bad.extend(special)
    report.bad.sort(key=lambda b: b.where)
    report.unverified.sort(key=lambda u: u.where)
    report.foreign.sort(key=lambda f: f.path)
    if fix:
        _fix(store, report)
    return report


def _fix(store: Store, report: VerifyReport) -> None:
    """Remove what failed its check (by key: only ever a chunk path) and stale temp files.

    On a disk store a bad chunk's file is removed only while it is still the file the
    check read: a serving process may have replaced it with a good copy meanwhile.
    A remote object has no such identity (and no conditional delete that every
    connector shares): it is checked again right before it is removed by key, and
    left alone unless it is still bad. A serving engine that missed on the bad
    chunk recomputes and puts it again, often while a large store's verify is
    still reading, and the fix deleted that good copy checked minutes earlier.
    """
    for b in report.bad:
        if b.key is None or b.status != CORRUPT:
            continue  # never remove what is not a confirmed bad chunk
        path = store.path_of(b.key)
        try:
            if path is not None and b.identity is not None:
                if not _unlink_if_unchanged(path, b.identity):
                    report.left_alone.append(b.where)
                    continue
            elif path is None:
                again = store.check(b.key)
                if again.status == UNVERIFIED:
                    report.fix_failures.append(f"{b.where}: not removed: {again.reason}")
                    continue
                if again.status == OK:  # written again since the check: a good copy stays
                    report.left_alone.append(b.where)
                    continue
                if again.status == CORRUPT:  # (MISSING: someone else removed it; gone all the same)
                    store.remove(b.key)
            else:
                store.remove(b.key)
            report.removed.append(b.where)
        except Exception as exc:
            report.fix_failures.append(f"{b.where}: {exc}")
    for t in report.temps:
        if not t.stale:
            continue  # a live writer's file: removing it would fail its write
        try:
            os.unlink(t.path)
            report.removed.append(t.path)
        except FileNotFoundError:
            report.removed.append(t.path)
        except OSError as exc:
            report.fix_failures.append(f"{t.path}: {exc.strerror or exc}")


def _unlink_if_unchanged(path: str, identity: FileIdentity) -> bool:
    """Unlink ``path`` when it is still the file ``identity`` was taken from (or already
    gone: True); False when another file is there now (a writer's ``os.replace``),
    which stays (``_unlink_unchanged``)."""
    return _unlink_unchanged(path, identity) != _CHANGED


# What ``_unlink_unchanged`` did.
_REMOVED = "removed"
_GONE = "gone"  # nothing at the path any more
_CHANGED = "changed"  # another file at the path: left alone


def _unlink_unchanged(path: str, identity: FileIdentity, *, used_at: float | None = None) -> str:
    """Unlink ``path`` only while it is the file ``identity`` was taken from (and, with
    ``used_at``, while it has not been read since: its atime is still ``used_at``).

    ``used_at``: a serving process's get marks the file used (atime); an evict plan
    picked it as least recently used, or older than ``--older-than``, by the atime it
    listed. Read since, it is neither any more, and removing it would evict the
    chunk just served (the confirmation prompt may wait minutes).

    ``lstat``: a link put at the path is not the file checked. The stat is taken
    right before the unlink; a replace landing between the two is the one window
    left (POSIX has no unlink-if-inode), microseconds against the seconds a
    verify of a large store leaves between a chunk's check and the fix (or the
    minutes an evict's confirmation prompt may wait).

    Returns:
        ``_REMOVED``, ``_GONE`` (removed by someone else already) or ``_CHANGED``.
    """
    try:
        st = os.lstat(path)
        if file_identity(st) != identity or (used_at is not None and st.st_atime > used_at):
            return _CHANGED
        os.unlink(path)
    except FileNotFoundError:
        return _GONE
    return _REMOVED


def _verify_tiers(
    store: Store, *, fix: bool, jobs: int, progress: Callable[[int, int], None] | None
) -> VerifyReport:
    """``verify_store`` over each persistent tier of a config-described store, as its own store."""
    cfg = store.config
    tiers: list[tuple[str, str]] = []
    if cfg.disk_path:
        tiers.append(("disk", cfg.disk_path))
    if cfg.remote_url:
        tiers.append(("remote", cfg.remote_url))
    report = VerifyReport()
    finished = [0, 0]  # chunks and bytes of the tiers done, so progress keeps counting up
    for name, url in tiers:
        last = [0, 0]

        def tier_progress(done: int, nbytes: int, last: list[int] = last) -> None:
            last[:] = [done, nbytes]
            if progress is not None:
                progress(finished[0] + done, finished[1] + nbytes)

        with Store(url, cfg) as tier_store:
            report.merge(verify_store(tier_store, fix=fix, jobs=jobs, progress=tier_progress), name)
        finished[0] += last[0]
        finished[1] += last[1]
    return report


# -- copying between stores --------------------------------------------------------------


@dataclass
class WarmResult:
    """What ``warm`` did. ``repaired`` chunks (bad copies the destination held,
    rewritten) are counted in ``copied`` too. ``gone``: listed in the source, not
    there when their copy began (the source's own eviction): no failure."""

    copied: int = 0
    skipped: int = 0
    repaired: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    gone: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_copied / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "copied": self.copied,
            "skipped": self.skipped,
            "repaired": self.repaired,
            "failed": len(self.failed),
            "failures": [{"key": k, "reason": r} for k, r in self.failed],
            "gone": len(self.gone),
            "gone_keys": self.gone,
            "bytes": self.bytes_copied,
            "seconds": round(self.seconds, 6),
            "gbps": round(self.gbps, 6),
        }


def held_copy_problem(store: Store, key: CacheEngineKey, *, full: bool = False) -> str | None:
    """Why ``store``'s copy of ``key`` cannot be trusted, or None when every
    persistent tier holds one that passes the check.

    The default check is cheap: the header parses, names ``key``, and the object's
    size is header + payload (a remote's header and size come from one ranged
    read). It catches truncated, empty and overwritten-header
    copies; a flipped payload byte needs ``full``, which reads and hashes the whole
    copy. Read-only: nothing is removed, a disk copy's atime is kept.
    """
    if store.root is not None:
        return _file_problem(layout.disk_path(store.root, key), key, full)
    backend = store.backend
    if left := backend.missing_tiers(key):
        return f"not in the {' and '.join(left)} tier"
    for name, tier in store.tiers() or [("", backend)]:
        if name == "memory":
            continue  # this process's own (and just filled by the put): nothing to distrust
        problem = _tier_problem(tier, key, full)
        if problem is not None:
            return f"{name} tier: {problem}" if name else problem
    return None


def _tier_problem(tier: Any, key: CacheEngineKey, full: bool) -> str | None:
    """``held_copy_problem`` for one tier that says it holds ``key``."""
    from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend
    from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend

    if isinstance(tier, LMCLocalDiskBackend):
        return _file_problem(layout.disk_path(tier.root, key), key, full)
    if not isinstance(tier, LMCRemoteBackend):
        return None  # memory: tensors, not bytes that could rot
    if full:
        try:
            buf = tier.fetch_bytes(key)
        except StoreUnavailableError as exc:
            return f"not verified: {exc}"
        if buf is None:
            return "not found"
        check = check_bytes(buf, key, key.to_string())
        return None if check.ok else check.reason
    # None for a bad header or size, another key, or no answer: rewriting it is right for
    # the first three, and a remote that does not answer fails the rewrite, which is reported.
    return None if tier.read_header(key) is not None else "no valid header or wrong size"


def _file_problem(path: str, key: CacheEngineKey, full: bool) -> str | None:
    """``held_copy_problem`` for a chunk file."""
    if full:
        check = check_file(path, key)
        return None if check.ok else check.reason
    try:
        with open_chunk_file(path, buffering=0) as f:
            header = chunk_format.read_header(f, total_size=os.fstat(f.fileno()).st_size)
        chunk_format.check_identity(header, None if header.key == "" else key.to_string())  # as the disk tier reads
    except FileNotFoundError:
        return "not found"
    except CorruptChunkError as exc:
        return exc.reason
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None


def copy_chunk(
    src: Store, dst: Store, key: CacheEngineKey, *, verify_existing: bool = False, helper: Any = None
) -> tuple[str, int, str]:
    """Copy one chunk and read it back from ``dst`` to verify it.

    A copy ``dst`` already holds is skipped only when it passes ``held_copy_problem``
    (its header and size; with ``verify_existing`` its checksum too); one that fails
    is rewritten (``repaired``). The source is read like ``get KEY`` reads: a bad
    source chunk fails the copy with its reason and stays where it is, and no
    source chunk's age changes. ``helper`` goes to ``Store.read_verified``.

    Returns:
        (outcome, bytes, reason): outcome ``copied``, ``repaired`` (``dst`` held a bad
        copy, now replaced), ``skipped`` (``dst`` has a good one), ``missing`` (not
        in the source, and nothing of it in ``dst``) or ``failed``.
    """
    # A tiered destination answers contains() from any tier: warm every tier that lacks it,
    # or a remote write that failed once would be skipped on every rerun.
    missing = dst.backend.missing_tiers(key)
    problem = None if missing else held_copy_problem(dst, key, full=verify_existing)
    if not missing and problem is None:
        return "skipped", 0, ""
    chunk, check = src.read_verified(key, helper=helper)
    if chunk is None:
        if check.status == MISSING:
            # "missing" (a live source evicted it: warm counts it gone) only when the
            # destination holds nothing of it; a bad or partial copy there, which no
            # source can repair now, stays a failure.
            if problem is not None:
                return "failed", 0, f"missing in the source, and the destination's copy is bad: {problem}"
            if missing and dst.contains(key):
                return "failed", 0, f"missing in the source; the destination lacks it in the {' and '.join(missing)} tier"
            return "missing", 0, "missing in the source"
        if check.status == CORRUPT:
            return "failed", 0, f"source chunk is bad: {check.reason} (left in place; `lmcache verify` reports it)"
        return "failed", 0, f"source chunk {check.reason}"
    # The checksum the source chunk was just verified against (no second hash of it).
    expected = check.header.checksum if check.header is not None else None
    if expected is None:
        expected = chunk_format.checksum(chunk_format.payload_view(chunk))
    dst.backend.put(key, chunk, blocking=True)
    back = dst.backend.get(key)
    if back is None:
        return "failed", 0, "not readable from the destination after the write"
    if (
        back.dtype != chunk.dtype
        or tuple(back.shape) != tuple(chunk.shape)
        or chunk_format.checksum(chunk_format.payload_view(back)) != expected
    ):
        dst.remove(key)  # never leave a bad copy behind
        return "failed", 0, "destination copy does not match the source checksum"
    if left := dst.backend.missing_tiers(key):
        return "failed", 0, f"not stored in the {' and '.join(left)} tier (it refused the write or is down)"
    return ("repaired" if problem is not None else "copied"), chunk.numel() * chunk.element_size(), ""


def warm(
    src: Store,
    dst: Store,
    keys: Sequence[CacheEngineKey],
    *,
    jobs: int = 4,
    verify_existing: bool = False,
    listed: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> WarmResult:
    """Copy ``keys`` from ``src`` to ``dst`` with ``jobs`` workers, skipping chunks
    ``dst`` holds good copies of and verifying each copy (see ``copy_chunk``).

    Args:
        verify_existing: read the copies ``dst`` holds in full (checksum) before
            skipping them, not only their headers and sizes; doubles the reads of a rerun.
        listed: ``keys`` come from listing ``src``: one missing there now was
            removed since (a live store evicts), and counts as ``gone``, not failed.
            Without it (keys someone named) a missing chunk is a failure.
        progress: called as each chunk finishes with (outcome, bytes copied).
    """
    result = WarmResult()
    # Open the backends up front (lazy opening from several workers would race),
    # and before the clock starts: the first open imports torch. A disk source is
    # read from its files and never opened as a backend: opening one rebuilds its
    # index and cleans its temp files, and warm only reads the source.
    _ = dst.backend if src.is_disk else (src.backend, dst.backend)
    # Several workers each splitting a large read with the shared checksum helper
    # measured slower than each reading alone.
    helper = chunk_format.ALONE if min(jobs, len(keys)) > 1 else None
    start = time.perf_counter()
    with worker_pool(jobs) as pool:
        futures = {
            pool.submit(copy_chunk, src, dst, k, verify_existing=verify_existing, helper=helper): k for k in keys
        }
        for fut in as_completed(futures):
            key = futures[fut]
            try:
                outcome, nbytes, reason = fut.result()
            except Exception as exc:  # one failing chunk must not stop the rest
                outcome, nbytes, reason = "failed", 0, mask_urls_in(f"{type(exc).__name__}: {exc}")
            if outcome in ("copied", "repaired"):
                result.copied += 1
                result.repaired += outcome == "repaired"
                result.bytes_copied += nbytes
            elif outcome == "skipped":
                result.skipped += 1
            elif outcome == "missing" and listed:
                result.gone.append(key.to_string())
            else:
                result.failed.append((key.to_string(), reason))
            if progress is not None:
                progress(outcome, nbytes)
    result.seconds = time.perf_counter() - start
    result.failed.sort()
    result.gone.sort()
    return result


# -- tokens ----------------------------------------------------------------------------------


def prefix_lookup(
    store: Store,
    token_ids: Any,
    *,
    model: str,
    fmt: str = "vllm",
    chunk_size: int = 256,
    world_size: int = 1,
    worker_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """How many leading tokens (and chunks) of a prompt are cached, per tier.

    Each chunk's header is read (no payload): a chunk that is truncated, foreign,
    or of another length or shape ends the prefix where ``get --tokens`` would end
    it (``lookup`` said "600 of 600 tokens" over three emptied files, and over a
    Redis or S3 object cut short, since ``contains`` only asks whether the name
    exists). Overall, each chunk is judged by the first tier that holds a sound
    header for it, as ``get --tokens`` reads the first tier with a good copy.
    Payload checksums are ``verify``'s job. On a disk store no torch is imported.

    Args:
        progress: called with (chunks done, chunks total) after each chunk of the
            prompt is judged in every tier, and once with (total, total) when the
            prefix ends early in all of them (the rest need no look).

    Raises:
        ValueError: an unknown ``fmt`` (or an invalid model name or rank).
        StoreUnavailableError: a remote tier did not answer (not "0 cached").
    """
    if fmt not in TOKEN_AXIS:
        raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(TOKEN_AXIS)}")
    hashes = chunk_hashes(token_ids, chunk_size)
    n = len(token_ids)
    keys = [CacheEngineKey(fmt, model, world_size, worker_id, h) for h in hashes]
    axis = TOKEN_AXIS[fmt]
    tiers: list[tuple[str, Any]] = (
        [(store.describe(), None)] if store.is_disk else (store.tiers() or [(store.backend.describe(), store.backend)])
    )
    # One pass over the prompt's chunks, every prefix (each tier's, then the overall one,
    # which takes each chunk from the first tier holding a sound header) advanced
    # together: the headers read are those one pass per prefix would read, each once,
    # and a chunk is done once, so progress counts the prompt's chunks. The last slot
    # is the overall prefix.
    prefixes = [range(t, t + 1) for t in range(len(tiers))] + [range(len(tiers))]
    hits = [0] * len(prefixes)
    firsts: list[ChunkHeader | None] = [None] * len(prefixes)
    open_ = set(range(len(prefixes)))
    for i, k in enumerate(keys):
        seen: dict[int, ChunkHeader | None] = {}  # tier -> this chunk's header there

        def header(t: int, k: CacheEngineKey = k, seen: dict[int, ChunkHeader | None] = seen) -> ChunkHeader | None:
            if t not in seen:
                name, tier = tiers[t]
                seen[t] = store.header(k) if tier is None else _tier_header(name, tier, k)
            return seen[t]

        for p in sorted(open_):
            h = next((h for t in prefixes[p] if (h := header(t)) is not None), None)
            if h is None or not _continues(h, k, firsts[p], axis, min(chunk_size, n - i * chunk_size)):
                open_.discard(p)
            else:
                firsts[p] = firsts[p] or h
                hits[p] += 1
        if progress is not None:
            progress(len(keys) if not open_ else i + 1, len(keys))
        if not open_:
            break  # every prefix has ended: the later chunks cannot extend any
    per_tier = {name: min(n, hits[t] * chunk_size) for t, (name, _) in enumerate(tiers)}
    overall = hits[-1]
    tokens = min(n, overall * chunk_size)
    return {
        "model": model,
        "tokens": tokens,
        "chunks": overall,
        "total_tokens": n,
        "total_chunks": len(keys),
        "chunk_size": chunk_size,
        "per_tier": [{"tier": k, "tokens": v, "chunks": -(-v // chunk_size)} for k, v in per_tier.items()],
    }


def _file_header(path: str) -> ChunkHeader | None:
    """A chunk file's header (its size checked against it); None when absent or unreadable.
    Read-only, atime kept (``open_chunk_file``)."""
    try:
        with open_chunk_file(path) as f:
            return chunk_format.read_header(f, total_size=os.fstat(f.fileno()).st_size)
    except (OSError, CorruptChunkError):
        return None


def _tier_header(name: str, tier: Any, key: CacheEngineKey) -> ChunkHeader | None:
    """One tier's header of ``key`` for ``prefix_lookup``: a remote's from a ranged read
    (raises on an outage), a disk tier's from its file (no index, atime kept), a memory
    tier's from its tensor.

    Raises:
        StoreUnavailableError: a remote tier did not answer.
    """
    from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend
    from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend

    if isinstance(tier, LMCRemoteBackend):
        # ``contains`` first: it is the question ``store_tiers.answered`` watches
        # (an unanswered one is an error, a retried one an answer), and a key this
        # process knows is absent costs no ranged read.
        if not tier.contains(key):
            return None
        return cast("ChunkHeader | None", tier.fetch_header(key))
    if isinstance(tier, LMCLocalDiskBackend):
        return _file_header(layout.disk_path(tier.root, key))
    return cast("ChunkHeader | None", tier.read_header(key))


def _continues(header: ChunkHeader, key: CacheEngineKey, first: ChunkHeader | None, axis: int, tokens: int) -> bool:
    """Whether the chunk ``header`` describes can extend a prefix whose first chunk is
    ``first``: ours, under ``key`` (or unkeyed), ``tokens`` long on ``axis``, and of
    ``first``'s dtype and other dimensions (``tokens.continues_prefix`` on headers)."""
    try:
        chunk_format.check_identity(header, None if header.key == "" else key.to_string())
    except CorruptChunkError:
        return False
    shape = header.shape
    if len(shape) != 5 or shape[axis] != tokens:
        return False
    if first is None:
        return True
    return header.dtype == first.dtype and all(shape[d] == first.shape[d] for d in range(5) if d != axis)


@dataclass
class PrefixRead:
    """What ``read_prefix`` found: the usable leading chunks, and why the prefix ended
    before the chunks the store lists ran out (None when it did not)."""

    chunks: list[Any]  # torch tensors, in prompt order
    tokens: int  # leading tokens they cover
    total_tokens: int
    total_chunks: int
    token_axis: int
    stopped: ChunkCheck | None = None

    def joined(self) -> torch.Tensor | None:
        """The prefix's KV as one tensor (the chunks joined on the token axis); None if empty."""
        if not self.chunks:
            return None
        if len(self.chunks) == 1:
            return cast("torch.Tensor", self.chunks[0])
        import torch

        return torch.cat(self.chunks, dim=self.token_axis)


def read_prefix(
    store: Store,
    token_ids: Any,
    *,
    model: str,
    fmt: str = "vllm",
    chunk_size: int = 256,
    world_size: int = 1,
    worker_id: int = 0,
    jobs: int = 4,
    progress: Callable[[int, int, int], None] | None = None,
) -> PrefixRead:
    """The leading chunks of a prompt that the store holds and that pass their check.

    Read like ``get KEY`` reads (``Store.read_verified``): a chunk that fails ends
    the prefix and is reported in ``stopped`` (never deleted, its age unchanged),
    as is a chunk that cannot extend it (another dtype or shape, or not exactly the
    tokens it should cover: ``tokens.chunk_tokens``). Up to ``jobs`` chunks are read at once, in order.

    Args:
        progress: called with (chunks done, chunks total, bytes read) as each chunk
            of the prefix is read and accepted, in order, and once with (total,
            total, bytes read) when the prefix ends early (the rest are not read).

    Raises:
        ValueError: an invalid model name, fmt or rank.
    """
    from lmcache_core.tokens import TOKEN_AXIS, chunk_tokens, continues_prefix  # imports torch

    if fmt not in TOKEN_AXIS:
        raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(TOKEN_AXIS)}")
    axis = TOKEN_AXIS[fmt]
    n = int(token_ids.shape[0]) if hasattr(token_ids, "shape") else len(token_ids)
    keys = [CacheEngineKey(fmt, model, world_size, worker_id, h) for h in chunk_hashes(token_ids, chunk_size)]
    held = 0
    for k in keys:  # existence first: a prefix ends at the first chunk the store lacks
        if not store.contains(k):
            break
        held += 1

    workers = max(1, min(jobs, held))
    # Reads side by side each read alone: several each splitting with the shared
    # checksum helper measured slower.
    helper = chunk_format.ALONE if workers > 1 else None

    def one(key: CacheEngineKey) -> tuple[Any, ChunkCheck]:
        try:
            return store.read_verified(key, helper=helper)
        except StoreUnavailableError as exc:
            return None, ChunkCheck(key, key.to_string(), False, f"not verified: {exc}", status=UNVERIFIED)

    found: list[Any] = []
    nbytes = 0
    stopped: ChunkCheck | None = None
    if held:
        with worker_pool(workers) as pool:
            reads = [pool.submit(one, k) for k in keys[:held]]
            for i, fut in enumerate(reads):
                chunk, check = fut.result()
                if chunk is None:
                    stopped = check
                elif not continues_prefix(found, chunk, axis, chunk_tokens(i, n, chunk_size)):
                    reason = f"does not continue the prefix ({str(chunk.dtype).removeprefix('torch.')} {tuple(chunk.shape)})"
                    stopped = ChunkCheck(keys[i], keys[i].to_string(), False, reason, check.header, MISMATCHED)
                else:
                    found.append(chunk)
                    nbytes += chunk.numel() * chunk.element_size()
                    if progress is not None:
                        progress(i + 1, len(keys), nbytes)
                    continue
                for later in reads[i + 1 :]:  # past the end of the prefix: not read
                    later.cancel()
                break
    if progress is not None and keys and len(found) < len(keys):
        progress(len(keys), len(keys), nbytes)  # the prefix ended: nothing more to read
    covered = sum(int(c.shape[axis]) for c in found)  # each chunk exactly its tokens (continues_prefix)
    return PrefixRead(found, covered, n, len(keys), axis, stopped)


# -- values ------------------------------------------------------------------------------------


def value_stats(tensor: torch.Tensor, per_layer: bool = False) -> dict[str, Any]:
    """min/max/mean/std over finite values, and NaN and Inf counts (per layer on dim 0)."""
    import torch

    def one(t: torch.Tensor) -> dict[str, Any]:
        x = t.detach().reshape(-1)
        if not x.dtype.is_floating_point:
            x = x.to(torch.float64)
        else:
            x = x.to(torch.float32) if x.element_size() < 4 else x
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        finite = x[torch.isfinite(x)] if (nan or inf) else x
        if finite.numel() == 0:
            return {"min": None, "max": None, "mean": None, "std": None, "nan": nan, "inf": inf}
        f64 = finite.to(torch.float64)
        lo, hi = float(f64.min()), float(f64.max())
        mean, std = float(f64.mean()), float(f64.std(unbiased=False))
        if not (math.isfinite(mean) and math.isfinite(std)):
            # The sums behind them overflowed (finite float64 values near the type's
            # limit, all 1.5e308: mean inf). Scaled by a power of two, which is exact,
            # and only then: the scaled copy is another float64 chunk.
            scale = math.ldexp(1.0, math.frexp(max(abs(lo), abs(hi)))[1] - 1)
            y = f64 / scale
            mean, std = float(y.mean()) * scale, float(y.std(unbiased=False)) * scale
        return {"min": lo, "max": hi, "mean": mean, "std": std, "nan": nan, "inf": inf}

    out: dict[str, Any] = {"all": one(tensor)}
    if per_layer and tensor.dim() >= 1:
        out["layers"] = [one(tensor[i]) for i in range(tensor.shape[0])]
    return out


def mask_urls_in(text: str) -> str:
    """``text`` with every secret in it masked: ``config.mask_secrets_in``, which also
    catches ``user:pw@`` without a scheme (botocore quotes a bucket so)."""
    return mask_secrets_in(text)


def read_keys(lines: Iterable[str]) -> list[CacheEngineKey]:
    """Key strings, one a line (blank lines and ``#`` comments skipped).

    Raises:
        ValueError: naming the line number of the first invalid key.
    """
    keys = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            keys.append(CacheEngineKey.from_string(text))
        except ValueError as exc:
            raise ValueError(f"line {n}: {exc}") from None
    return keys
