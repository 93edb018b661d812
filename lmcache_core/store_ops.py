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

import errno
import fnmatch
import os
import re
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, cast
from urllib.parse import urlsplit

from lmcache_core import chunk_format, layout
from lmcache_core.chunk_format import ChunkHeader
from lmcache_core.config import LMCacheEngineConfig, mask_url, store_kind
from lmcache_core.errors import CorruptChunkError
from lmcache_core.key import CacheEngineKey, chunk_hashes

if TYPE_CHECKING:
    import torch

    from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface

# The disk tier's temp-file naming (``local_backend._temp_path``): ".<name>.<host>.<pid>.<n>.tmp".
TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 3600.0
# A store opened by a tool must never evict on open: the budget is the deployment's
# business (a config file sets one explicitly when wanted).
UNLIMITED_GB = 1e9
_HOST = socket.gethostname().replace(".", "_")


@dataclass(frozen=True)
class ChunkEntry:
    """A chunk as a listing sees it: key, stored size and times (None when unknown)."""

    key: CacheEngineKey
    size: int | None = None
    mtime: float | None = None
    atime: float | None = None

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


@dataclass(frozen=True)
class ChunkCheck:
    """Result of reading one chunk in full."""

    key: CacheEngineKey | None
    where: str  # key string, or the file path for unparseable names
    ok: bool
    reason: str = ""
    header: ChunkHeader | None = None


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
            self.kind, self.root = _config_kind(self.config)

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
        from lmcache_core.storage_backend import CreateStorageBackend, open_backend

        cfg = self.config
        if cfg.sources.get("max_local_disk_size", "default") == "default":
            cfg = cfg.replace(_source="lmcache tool (never evict on open)", max_local_disk_size=UNLIMITED_GB)
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
                ChunkEntry(key, st.st_size, st.st_mtime, st.st_atime)
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
        """The chunk's header without its payload; None when absent or unreadable."""
        path = self.path_of(key)
        if path is None:
            return self.backend.read_header(key)
        try:
            with open_chunk_file(path) as f:
                return chunk_format.read_header(f, total_size=os.fstat(f.fileno()).st_size)
        except (OSError, CorruptChunkError):
            return None

    # -- reading in full -----------------------------------------------------------

    def check(self, key: CacheEngineKey) -> ChunkCheck:
        """Read the whole chunk and check header, key and checksum."""
        path = self.path_of(key)
        if path is not None:
            return check_file(path, key)
        chunk = self.backend.get(key)
        if chunk is None:
            return ChunkCheck(key, key.to_string(), False, "missing, unreadable or failed its checksum")
        return ChunkCheck(key, key.to_string(), True, header=_header_of(chunk, key))

    def read(self, key: CacheEngineKey) -> tuple[torch.Tensor | None, ChunkCheck]:
        """The chunk's tensor and its check; on a disk store a chunk that fails its
        checksum is still decoded (when its header is sound) so it can be inspected."""
        path = self.path_of(key)
        if path is None:
            chunk = self.backend.get(key)
            if chunk is None:
                return None, ChunkCheck(key, key.to_string(), False, "not found (or failed its checksum)")
            return chunk, ChunkCheck(key, key.to_string(), True, header=_header_of(chunk, key))
        try:
            with open_chunk_file(path) as f:
                buf = bytearray(f.read())
        except FileNotFoundError:
            return None, ChunkCheck(key, key.to_string(), False, "not found")
        except OSError as exc:
            return None, ChunkCheck(key, key.to_string(), False, f"unreadable: {exc.strerror or exc}")
        result = check_bytes(buf, key, key.to_string())
        if result.header is None:
            return None, result
        return chunk_format.decode(buf, verify=False), result

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
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                out.append(TempFile(path, st.st_size, st.st_mtime, is_stale_temp(name, st.st_mtime, now)))
        return out

    def foreign_chunk_files(self) -> list[str]:
        """Files named like chunks whose path is not a valid chunk path (disk only)."""
        if self.root is None:
            return []
        return [
            p
            for p, _, key in layout.scan_store(self.root)
            if key is None and layout.is_chunk_name(os.path.basename(p))
        ]


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


def is_stale_temp(name: str, mtime: float, now: float) -> bool:
    """A temp file whose writer (same host, pid in the name) is dead, or older than an hour."""
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
    if len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit():
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            pass
    return now - mtime > STALE_TEMP_SECONDS


def open_chunk_file(path: str) -> Any:
    """Open a chunk file for reading; only regular files (``disk_io.open_read``'s rule).

    ``O_NONBLOCK``: a FIFO planted at a chunk path would otherwise block ``open``
    forever and hang ``show``/``get``/``verify``.

    Raises:
        OSError: ``EINVAL`` for a FIFO, device or socket; the usual errors otherwise.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_bytes(buf: Any, key: CacheEngineKey | None, where: str) -> ChunkCheck:
    """Check a whole chunk held in memory: header, identity, checksum."""
    mv = memoryview(buf).cast("B")
    try:
        header = chunk_format.parse_header(mv[: 8 + chunk_format.MAX_HEADER_BYTES], total_size=len(mv))
    except CorruptChunkError as exc:
        return ChunkCheck(key, where, False, f"bad header: {exc.reason}")
    try:
        chunk_format.check_identity(header, key.to_string() if key is not None else None)
        chunk_format.verify_payload(header, mv[header.data_offset :])
    except CorruptChunkError as exc:
        return ChunkCheck(key, where, False, exc.reason, header)
    return ChunkCheck(key, where, True, header=header)


def check_file(path: str, key: CacheEngineKey | None) -> ChunkCheck:
    """Read a chunk file in full and check it."""
    where = key.to_string() if key is not None else path
    try:
        with open_chunk_file(path) as f:
            buf = f.read()
    except FileNotFoundError:
        return ChunkCheck(key, where, False, "not found")
    except OSError as exc:
        return ChunkCheck(key, where, False, f"unreadable: {exc.strerror or exc}")
    return check_bytes(buf, key, where)


# -- selection -----------------------------------------------------------------------


def match_key(key: CacheEngineKey, pattern: str | None) -> bool:
    """Glob match on the key string; a pattern without ``*?[`` matches as a substring."""
    if not pattern:
        return True
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
    """Entries matching every given filter (``older_than`` in seconds since last use)."""
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


def run_evict(store: Store, plan: EvictPlan) -> tuple[int, int, list[str]]:
    """Remove the plan's chunks; returns (removed, bytes freed, failures)."""
    removed = freed = 0
    failures: list[str] = []
    for v in plan.victims:
        try:
            if store.remove(v.key):
                removed += 1
                freed += v.size or 0
        except Exception as exc:  # one bad chunk must not stop the rest
            failures.append(f"{v.key}: {exc}")
    return removed, freed, failures


# -- verification ----------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``verify_store`` found (and fixed)."""

    checked: int = 0
    ok: int = 0
    bad: list[ChunkCheck] = field(default_factory=list)
    temps: list[TempFile] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # what --fix removed
    fix_failures: list[str] = field(default_factory=list)

    @property
    def remaining_problems(self) -> int:
        fixed = set(self.removed)
        bad_left = [b for b in self.bad if _problem_id(b) not in fixed]
        temps_left = [t for t in self.temps if t.stale and t.path not in fixed]
        return len(bad_left) + len(temps_left)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "ok": self.ok,
            "bad": [{"chunk": b.where, "reason": b.reason} for b in self.bad],
            "temp_files": [
                {"path": t.path, "size": t.size, "stale": t.stale} for t in self.temps
            ],
            "removed": self.removed,
            "fix_failures": self.fix_failures,
            "problems_left": self.remaining_problems,
        }


def _problem_id(check: ChunkCheck) -> str:
    return check.where


def verify_store(
    store: Store,
    *,
    fix: bool = False,
    jobs: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read every chunk and check header, key and checksum; find stray temp files.

    Args:
        fix: remove bad chunks and stale temp files (a live writer's temp file stays).
        jobs: chunks checked in parallel (checksums release the GIL on large buffers).
        progress: called with (chunks checked, bytes checked) as work completes.
    """
    report = VerifyReport()
    targets: list[tuple[CacheEngineKey | None, str | None, int]] = []
    special: list[ChunkCheck] = []
    if store.root is not None:
        for path, st, key in layout.scan_store(store.root, special=True):
            name = os.path.basename(path)
            if not stat.S_ISREG(st.st_mode):
                special.append(ChunkCheck(None, path, False, "not a regular file (FIFO, device, socket or link)"))
            elif key is not None or layout.is_chunk_name(name):
                targets.append((key, path, st.st_size))
        report.temps = store.temp_files()
    else:
        targets = [(e.key, None, e.size or 0) for e in store.entries()]

    def one(target: tuple[CacheEngineKey | None, str | None, int]) -> ChunkCheck:
        key, path, _ = target
        if key is None:
            assert path is not None
            return ChunkCheck(None, path, False, "file named like a chunk but not at a chunk path")
        if path is not None:
            return check_file(path, key)
        return store.check(key)

    done_bytes = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(one, t): t for t in targets}
        for fut in as_completed(futures):
            result = fut.result()
            report.checked += 1
            done_bytes += futures[fut][2]
            if result.ok:
                report.ok += 1
            elif result.reason != "not found":  # removed by someone else meanwhile
                report.bad.append(result)
            else:
                report.checked -= 1
            if progress is not None:
                progress(report.checked, done_bytes)
    report.bad.extend(special)
    report.bad.sort(key=lambda b: b.where)
    if fix:
        for b in report.bad:
            try:
                if b.key is not None:
                    store.remove(b.key)
                else:
                    os.unlink(b.where)
                report.removed.append(b.where)
            except FileNotFoundError:
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
    return report


# -- copying between stores --------------------------------------------------------------


@dataclass
class WarmResult:
    """What ``warm`` did."""

    copied: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    bytes_copied: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_copied / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "copied": self.copied,
            "skipped": self.skipped,
            "failed": len(self.failed),
            "failures": [{"key": k, "reason": r} for k, r in self.failed],
            "bytes": self.bytes_copied,
            "seconds": round(self.seconds, 6),
            "gbps": round(self.gbps, 6),
        }


def copy_chunk(src: Store, dst: Store, key: CacheEngineKey) -> tuple[str, int, str]:
    """Copy one chunk and read it back from ``dst`` to verify it.

    Returns:
        (outcome, bytes, reason): outcome ``copied``, ``skipped`` (``dst`` has it) or ``failed``.
    """
    if dst.contains(key):
        return "skipped", 0, ""
    chunk = src.backend.get(key)  # the source backend verifies the checksum on read
    if chunk is None:
        return "failed", 0, "missing in the source or failed its checksum there"
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
    return "copied", chunk.numel() * chunk.element_size(), ""


def warm(
    src: Store,
    dst: Store,
    keys: Sequence[CacheEngineKey],
    *,
    jobs: int = 4,
    progress: Callable[[str, int], None] | None = None,
) -> WarmResult:
    """Copy ``keys`` from ``src`` to ``dst`` with ``jobs`` workers, skipping chunks
    ``dst`` has and verifying each copy.

    Args:
        progress: called as each chunk finishes with (outcome, bytes copied).
    """
    result = WarmResult()
    # Open both backends up front (lazy opening from several workers would race),
    # and before the clock starts: the first open imports torch.
    _ = src.backend, dst.backend
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(copy_chunk, src, dst, k): k for k in keys}
        for fut in as_completed(futures):
            key = futures[fut]
            try:
                outcome, nbytes, reason = fut.result()
            except Exception as exc:  # one failing chunk must not stop the rest
                outcome, nbytes, reason = "failed", 0, mask_urls_in(f"{type(exc).__name__}: {exc}")
            if outcome == "copied":
                result.copied += 1
                result.bytes_copied += nbytes
            elif outcome == "skipped":
                result.skipped += 1
            else:
                result.failed.append((key.to_string(), reason))
            if progress is not None:
                progress(outcome, nbytes)
    result.seconds = time.perf_counter() - start
    result.failed.sort()
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
) -> dict[str, Any]:
    """How many leading tokens (and chunks) of a prompt are cached, per tier.

    On a disk store this checks file existence only (no torch, no payload reads).
    """
    hashes = chunk_hashes(token_ids, chunk_size)
    n = len(token_ids)
    keys = [CacheEngineKey(fmt, model, world_size, worker_id, h) for h in hashes]
    if store.is_disk:
        hits = 0
        for k in keys:
            if not store.contains(k):
                break
            hits += 1
        tokens = min(n, hits * chunk_size)
        per_tier = {store.describe(): tokens}
    else:
        from lmcache_core.tokens import ChunkedKVStore

        look = ChunkedKVStore(
            store.backend, model, fmt=fmt, chunk_size=chunk_size, world_size=world_size, worker_id=worker_id
        ).lookup(token_ids)
        hits, tokens, per_tier = look.chunks, look.tokens, dict(look.per_tier)
    return {
        "model": model,
        "tokens": tokens,
        "chunks": hits,
        "total_tokens": n,
        "total_chunks": len(keys),
        "chunk_size": chunk_size,
        "per_tier": [{"tier": k, "tokens": v, "chunks": -(-v // chunk_size)} for k, v in per_tier.items()],
    }


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
        return {
            "min": float(f64.min()),
            "max": float(f64.max()),
            "mean": float(f64.mean()),
            "std": float(f64.std(unbiased=False)),
            "nan": nan,
            "inf": inf,
        }

    out: dict[str, Any] = {"all": one(tensor)}
    if per_layer and tensor.dim() >= 1:
        out["layers"] = [one(tensor[i]) for i in range(tensor.shape[0])]
    return out


_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+")


def mask_urls_in(text: str) -> str:
    """``text`` with the password of every URL in it masked (see ``mask_url``)."""
    return _URL_RE.sub(lambda m: mask_url(m.group(0)) if ("@" in m.group(0) or "?" in m.group(0)) else m.group(0), text)


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
