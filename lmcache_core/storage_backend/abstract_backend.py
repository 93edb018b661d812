"""The backend contract every tier implements (the seed's ``LMCBackendInterface``).

Subclasses implement ``put``/``get``/``contains``/``close`` and, where the medium
can, ``remove``/``list``; batching, context management, argument checks and
counters are built here once.
"""

from __future__ import annotations

import abc
import builtins
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Tuple

import torch

from lmcache_core.chunk_format import dtype_name
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.devices import resolve_device, used_on

if TYPE_CHECKING:
    from lmcache_core.chunk_format import ChunkHeader


@dataclass(frozen=True)
class ChunkInfo:
    """What a listing knows about a chunk without reading its payload."""

    key: CacheEngineKey
    size: int | None = None  # stored bytes, header included
    mtime: float | None = None  # POSIX seconds when written, if the medium knows
    atime: float | None = None  # POSIX seconds of last use, if the medium knows


# Fork safety: a backend rebuilds its threads and locks in a forked child on first
# use, under this lock. A lock another thread held at fork() stays held in the child
# forever, so the child gets a fresh one.
_fork_lock = threading.Lock()


def _reset_fork_lock() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_fork_lock)


class BackendStats:
    """Named event counters (hits, misses, corrupt, put_failures, ...). Thread-safe."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def incr(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def check_key(key: Any) -> CacheEngineKey:
    if not isinstance(key, CacheEngineKey):
        raise TypeError(f"key must be a CacheEngineKey, got {type(key).__name__}")
    return key


def check_chunk(kv_chunk: Any) -> torch.Tensor:
    if not isinstance(kv_chunk, torch.Tensor):
        raise TypeError(f"kv_chunk must be a torch.Tensor, got {type(kv_chunk).__name__}")
    dtype_name(kv_chunk.dtype)  # ValueError for dtypes the chunk format cannot hold
    if kv_chunk.is_sparse or kv_chunk.is_quantized:
        raise TypeError("kv_chunk must be a dense, non-quantized tensor")
    return kv_chunk


def check_device(dst_device: str) -> str:
    """Validate ``dst_device``; a CUDA device on a machine without one is a clear error."""
    resolve_device(dst_device)
    return dst_device


class LMCBackendInterface(metaclass=abc.ABCMeta):
    """A store of KV chunks by key.

    Implementations are thread-safe unless their docstring says otherwise. A miss
    is ``None``; bad arguments raise ``TypeError``/``ValueError`` at once.
    """

    def __init__(self, dst_device: str = "cuda") -> None:
        self.dst_device = check_device(dst_device)
        self.stats = BackendStats()
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        """In a forked child, run ``_after_fork`` once, before the first use. Thread-safe.

        The pid is recorded last: the child's other threads wait on the fork lock
        until the rebuild is done, instead of using half-rebuilt state.
        """
        if self._pid == os.getpid():
            return
        with _fork_lock:
            if self._pid == os.getpid():
                return
            self.stats = BackendStats()
            self._after_fork()
            self._pid = os.getpid()

    def _after_fork(self) -> None:  # noqa: B027 - optional hook
        """Rebuild what fork() broke (threads, and locks a parent thread may have held)."""

    @property
    def dst_device(self) -> str:
        """Where ``get`` puts tensors; may be reassigned (LMCache code sets it)."""
        return self._dst_device

    @dst_device.setter
    def dst_device(self, value: str) -> None:
        # Resolved once, not per get: a torch.device per get took ~20 us after a
        # 32 MiB read had pushed torch's code out of the CPU caches. A bare "cuda"
        # becomes the assigning thread's GPU (devices.resolve_device), so gets on
        # the library's own threads land there too, not on GPU 0.
        self._dst = resolve_device(value)
        self._dst_device = value

    @abc.abstractmethod
    def put(self, key: CacheEngineKey, kv_chunk: torch.Tensor, blocking: bool = True) -> None:
        """Store ``kv_chunk`` under ``key`` (no batch dimension).

        With ``blocking=False`` the write happens on a worker; reads see it at once.
        """

    @abc.abstractmethod
    def get(self, key: CacheEngineKey) -> torch.Tensor | None:
        """The chunk on ``dst_device``, or ``None`` when absent or unreadable."""

    @abc.abstractmethod
    def contains(self, key: CacheEngineKey) -> bool:
        """Whether ``key`` is stored (a hint for remotes: ``get`` may still miss)."""

    def missing_tiers(self, key: CacheEngineKey) -> builtins.list[str]:
        """The tiers of this store that lack ``key``; [] when every one holds it.

        ``contains`` is true when any tier holds the chunk; a tool that copies chunks
        in (``lmcache warm``, ``put --tokens``) needs every tier, or a write one tier
        refused would be skipped on every rerun. Default: this store is its one tier.
        """
        return [] if self.contains(key) else [self.describe()]

    @abc.abstractmethod
    def close(self) -> None:
        """Drain pending writes, then release resources. Idempotent."""

    def batched_put(
        self, keys_and_chunks: Iterable[Tuple[CacheEngineKey, torch.Tensor]], blocking: bool = True
    ) -> int:
        """Store several chunks; returns how many were stored (or queued)."""
        count = 0
        for key, chunk in keys_and_chunks:
            self.put(key, chunk, blocking=blocking)
            count += 1
        return count

    def batched_get(self, keys: Iterable[CacheEngineKey]) -> list[torch.Tensor | None]:
        """Chunks aligned with ``keys``, ``None`` for each miss."""
        return [self.get(key) for key in keys]

    def remove(self, key: CacheEngineKey) -> bool:
        """Delete ``key``; returns whether it was there."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove chunks")

    def list(self) -> list[CacheEngineKey]:
        """Every stored key (foreign or unreadable objects are skipped)."""
        raise NotImplementedError(f"{type(self).__name__} cannot enumerate its chunks")

    def list_info(self) -> builtins.list[ChunkInfo]:
        """Keys with size and times where the medium knows them (no payload reads)."""
        return [ChunkInfo(key) for key in self.list()]

    def read_header(self, key: CacheEngineKey) -> ChunkHeader | None:
        """The stored chunk's header without its payload, ``None`` if absent or bad."""
        from lmcache_core import chunk_format

        chunk = self.get(key)
        if chunk is None:
            return None
        cpu = chunk.detach().cpu().contiguous()
        raw = chunk_format.encode_header(cpu, key.to_string())
        return chunk_format.parse_header(raw)

    def touch(self, key: CacheEngineKey) -> None:
        """Mark ``key`` recently used without reading it (tiers with an LRU override)."""
        return None  # tiers without recency (remote stores) have nothing to update

    def describe(self) -> str:
        """A one-line description safe to print (no secrets)."""
        return type(self).__name__

    def __enter__(self) -> LMCBackendInterface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _to_dst(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """``tensor`` on ``dst_device``; ``stream``: the caller's (``devices.caller_stream``)
        when a library thread makes the copy for it."""
        if tensor.device == self._dst:
            return tensor
        return used_on(tensor.to(self._dst, non_blocking=False), stream)
