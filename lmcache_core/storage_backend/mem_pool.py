"""Reusable warm buffers, so hot paths copy into touched memory instead of
allocating (a fresh 32 MiB allocation page-faults at about a fifth of the speed
of a copy into warm memory on these machines).

A buffer is handed out as a view; it is free again once nobody holds a view of
it, which the pool learns from the storage's reference count. So a tensor
returned to a caller stays valid for as long as the caller keeps it, and memory
is reused as soon as the caller lets go. ``acquire`` looks at a bounded number
of buffers (those ``release`` hinted at first), so it stays O(1) with 100k
small buffers retained. Thread-safe.

Interrupt-safe: a ``KeyboardInterrupt`` (or any exception a signal handler raises)
landing anywhere in a call leaves ``retained_bytes`` equal to what the pool keeps.
CPython runs signal handlers only at a function's start, a loop's back edge and
after a call returns, so each change of the pool's state is made of plain stores
and in-place operators with at most one call, last; anything that calls out
(allocating, counting references) runs before it. An interrupt that once landed
between counting a new buffer and keeping it left bytes counted that no buffer
held: the pool believed itself fuller and fuller, and puts went on allocating
fresh memory at a fifth of the speed of warm copies.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections import deque
from typing import Any, cast

import torch

from lmcache_core.storage_backend.devices import resolve_device

_ALIGN = 64  # bytes; keeps every buffer aligned for any dtype and SIMD loads
# Buffers examined per acquire beyond the hinted ones: a full scan would make each
# put O(retained buffers), quadratic when a store holds 100k small chunks. Small
# buffers are cheap to allocate fresh, so they get a shorter look.
_SCAN_LIMIT = 16
_SCAN_LIMIT_SMALL = 2
_SMALL_BYTES = 64 << 10
_MAX_HINTS = 4096
# When the pool is full and holds no free buffer of a requested capacity, free
# buffers of other capacities stop being retained (else a pool filled by chunks
# of one size would hold its whole budget idle while chunks of another size are
# allocated beside it, twice the budget in all). Bounded work per acquire.
_RECLAIM_RINGS = 32
_RECLAIM_SCAN = 64
# CPU buffers from this size on are asked for transparent huge pages (2 MiB): a
# 32 MiB buffer in 4 KiB pages costs 8192 TLB entries, and on these VMs (nested
# paging) a hot 32 MiB file read into it ran 5-7 % slower and hashing it 20 %
# slower than into huge pages. LMCache does the same with its pinned pools on CUDA.
_HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
# Pinned buffers are slots carved out of power-of-two slabs of at most this size.
# torch's pinned allocator rounds every allocation up to a power of two, so an
# 80 MiB chunk alone would lock 128 MiB; pinned memory cannot be swapped, so the
# budget must hold in the bytes actually locked. A 1 GiB slab of 80 MiB slots
# wastes 64 MiB (6 %), of 48 MiB ones 16 MiB.
_PINNED_SLAB_MAX = 1 << 30


def _pinned_empty(nbytes: int) -> torch.Tensor:
    """Page-locked host memory (tests without CUDA swap in plain memory)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """A uint8 CPU tensor over private anonymous memory advised for huge pages.

    None where the platform has no ``MADV_HUGEPAGE`` (or refuses it); the kernel
    falls back to small pages by itself when it has no huge page to give. The
    tensor keeps the mapping alive; it is unmapped once the last view is gone.
    """
    if _MADV_HUGEPAGE is None or nbytes <= 0:
        return None
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return None
    try:
        m.madvise(_MADV_HUGEPAGE)
    except OSError:
        pass  # still plain memory; THP may be disabled system-wide
    return torch.frombuffer(m, dtype=torch.uint8)


def _use_count(t: torch.Tensor) -> int:
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


_HAVE_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")


class BufferPool:
    """Warm uint8 buffers on one device, grouped by capacity.

    Args:
        device: where buffers live (``cpu``, ``cuda``, ``cuda:N``).
        max_bytes: most bytes retained for reuse; beyond it buffers are plain allocations.
        pin_memory: page-lock CPU buffers (faster, asynchronous copies to a GPU). They
            are carved from power-of-two slabs, whose whole size counts against
            ``max_bytes``; once no slab fits, retained buffers are plain memory, and
            buffers beyond ``max_bytes`` are never pinned (torch would keep them
            locked in its cache for good).
    """

    def __init__(
        self, device: str | torch.device = "cpu", max_bytes: int = 1 << 30, pin_memory: bool = False
    ) -> None:
        # Resolved: a bare "cuda" is the constructing thread's GPU, and buffers'
        # devices (cuda:N) compare equal to it.
        self.device = resolve_device(device, "device")
        self.max_bytes = max_bytes
        self.pin_memory = bool(pin_memory and self.device.type == "cpu" and torch.cuda.is_available())
        self.retained_bytes = 0  # bytes held for reuse: pinned slabs in full
        self._free: dict[int, deque[tuple[torch.Tensor, int]]] = {}
        # data_ptr -> (buffer, baseline use count), for buffers ``release`` hinted at
        self._by_ptr: dict[int, tuple[torch.Tensor, int]] = {}
        self._hints: deque[int] = deque(maxlen=_MAX_HINTS)
        # capacity -> pinned slots carved from a slab and not handed out yet (paid for)
        self._spare: dict[int, list[torch.Tensor]] = {}
        # data_ptrs of pinned slots: their slab is freed only with all its slots, so
        # they are never reclaimed one by one
        self._slotted: set[int] = set()
        self._lock = threading.Lock()

    @staticmethod
    def capacity_for(nbytes: int) -> int:
        return max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)

    def _allocate(self, capacity: int, touch: bool) -> torch.Tensor:
        """A new unpinned buffer."""
        buf = None
        if self.device.type == "cpu" and capacity >= _HUGE_PAGE_BYTES:
            buf = huge_page_buffer(capacity)
        if buf is None:
            buf = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        if touch:
            buf.zero_()  # fault the pages in now, not on the hot path
        return buf

    def _pinned_slot(self, capacity: int) -> tuple[torch.Tensor, list[torch.Tensor], int] | None:
        """A pinned buffer of ``capacity`` bytes, or None when no slab fits the budget.

        Call under the lock; nothing is changed here (``_new_buffer`` keeps the result):
        (the slot, the spare slots it leaves, the bytes of a new slab or 0). Each slot
        is its own storage over the slab's memory (so the use count says when that
        slot is free), and keeps the slab alive.
        """
        spare = self._spare.get(capacity)
        if spare:
            return spare[-1], spare, 0
        room = self.max_bytes - self.retained_bytes
        size = 1 << (capacity - 1).bit_length()  # the smallest power of two that holds one
        if size > room:
            return None
        while size * 2 <= min(room, _PINNED_SLAB_MAX):
            size *= 2
        slab = memoryview(cast(Any, _pinned_empty(size).numpy()))  # page-locked: already resident
        slots = [
            torch.frombuffer(slab[i * capacity : (i + 1) * capacity], dtype=torch.uint8)
            for i in range(size // capacity - 1, -1, -1)
        ]
        return slots[-1], slots, size  # the slab's start first

    def _new_buffer(self, capacity: int, touch: bool) -> torch.Tensor | None:
        """A new retained buffer, or None when it would go over ``max_bytes``. Call under the lock."""
        pinned = self._pinned_slot(capacity) if self.pin_memory else None
        if pinned is None:
            if self.retained_bytes + capacity > self.max_bytes:
                return None
            buf = self._allocate(capacity, touch)
            slots: list[torch.Tensor] | None = None
            cost = capacity
        else:
            buf, slots, cost = pinned
        # Everything that calls out first (see the module's docstring on interrupts).
        baseline = _use_count(buf) if _HAVE_USE_COUNT else 0
        entry = (buf, baseline)
        numel, ptr = buf.numel(), buf.data_ptr()
        slab_ptrs = {slot.data_ptr() for slot in slots} if slots is not None and cost else None
        ring = self._free.get(numel)
        new_ring: deque[tuple[torch.Tensor, int]] | None = deque() if ring is None else None
        # Kept: plain stores and in-place operators only, no interrupt lands among them.
        if slots is not None:
            del slots[-1]  # handed out now (the spare list, or a new slab's other slots)
            if slab_ptrs is not None:
                self._spare[capacity] = slots
                self._slotted |= slab_ptrs
        if new_ring is not None:
            ring = self._free[numel] = new_ring
        assert ring is not None
        ring += (entry,)
        self._by_ptr[ptr] = entry
        self.retained_bytes += cost
        return buf

    def _reclaim(self, capacity: int) -> None:
        """Stop retaining free buffers of other capacities until ``capacity`` more bytes
        fit in ``max_bytes`` (or a bounded look found too few). Call under the lock."""
        need = self.retained_bytes + capacity - self.max_bytes
        looks = _RECLAIM_SCAN
        for cap in list(itertools.islice(self._free, _RECLAIM_RINGS)):
            if need <= 0 or looks <= 0:
                return
            if cap == capacity:
                continue
            ring = self._free[cap]
            for _ in range(min(len(ring), looks)):
                looks -= 1
                buf, baseline = ring[0]
                ptr = buf.data_ptr()
                if ptr not in self._slotted and _use_count(buf) <= baseline:
                    # Nobody holds a view: dropping it frees the memory. Uncounted first,
                    # the one call last (an interrupt lands after it, never inside).
                    del self._by_ptr[ptr]
                    self.retained_bytes -= cap
                    need -= cap
                    ring.popleft()
                    if need <= 0:
                        break
                else:
                    ring.rotate(-1)
            # Moved last (the next look starts at other rings), or dropped when empty: one
            # step, so an interrupt never leaves a ring out of ``_free`` with its bytes counted.
            if ring:
                del self._free[cap]
                self._free[cap] = ring
            else:
                del self._free[cap]

    def reserve(self, count: int, nbytes: int) -> int:
        """Pre-allocate and touch up to ``count`` buffers for chunks of ``nbytes``.

        Returns the number reserved (bounded by ``max_bytes``).
        """
        capacity = self.capacity_for(nbytes)
        made = 0
        with self._lock:
            while made < count and self._new_buffer(capacity, touch=True) is not None:
                made += 1
        return made

    def release(self, tensor: torch.Tensor) -> None:
        """Hint that the caller dropped ``tensor`` (a view of a pool buffer).

        Only a hint: the buffer is reused once no view of it is left anywhere.
        """
        with self._lock:
            self._hints.append(tensor.untyped_storage().data_ptr())

    def _from_hints(self, capacity: int) -> torch.Tensor | None:
        while self._hints:
            entry = self._by_ptr.get(self._hints.popleft())
            if entry is not None and entry[0].numel() == capacity and _use_count(entry[0]) <= entry[1]:
                return entry[0]
        return None

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (uninitialised), warm when one is free."""
        capacity = self.capacity_for(nbytes)
        with self._lock:
            ring = self._free.get(capacity)
            if ring and _HAVE_USE_COUNT:
                hinted = self._from_hints(capacity) if self._hints else None
                if hinted is not None:
                    return hinted[:nbytes]
                limit = _SCAN_LIMIT if capacity >= _SMALL_BYTES else _SCAN_LIMIT_SMALL
                for _ in range(min(len(ring), limit)):
                    buf, baseline = ring[0]
                    ring.rotate(-1)
                    if _use_count(buf) <= baseline:
                        return buf[:nbytes]
            if _HAVE_USE_COUNT:
                new = self._new_buffer(capacity, touch=False)
                if new is None and self._free:
                    self._reclaim(capacity)
                    new = self._new_buffer(capacity, touch=False)
                if new is not None:
                    return new[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (one a parent thread held at fork() stays held).

        Call before any other thread of the child uses the pool."""
        self._lock = threading.Lock()
        # Pinning needs CUDA, which a child forked after the parent used it cannot
        # start: new buffers there are plain ones, not a RuntimeError per allocation.
        self.pin_memory = self.pin_memory and not torch.cuda._is_in_bad_fork()

    def clear(self) -> None:
        """Forget retained buffers (views already handed out stay valid)."""
        hints: deque[int] = deque(maxlen=_MAX_HINTS)
        slotted: set[int] = set()
        with self._lock:
            # Swapped in by plain stores: an interrupt leaves all of it or none forgotten.
            self._free, self._by_ptr, self._hints, self._spare, self._slotted, self.retained_bytes = (
                {}, {}, hints, {}, slotted, 0
            )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "retained_bytes": self.retained_bytes,
                "buffers": sum(len(r) for r in self._free.values()),
            }


_shared: dict[str, BufferPool] = {}
_shared_lock = threading.Lock()


def fixed_chunk_shape(metadata: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The chunk shape and dtype the engine metadata fixes, or None when it does not."""
    shape = getattr(metadata, "kv_shape", None)
    dtype = getattr(metadata, "kv_dtype", None)
    if shape and isinstance(dtype, torch.dtype):
        return tuple(int(d) for d in shape), dtype
    return None


#: Warm read buffers a store keeps when the metadata does not fix the chunk size
#: (eight 32 MiB chunks).
READ_POOL_BYTES = 256 << 20


def read_pool_bytes(metadata: Any, batch: int = 16) -> int:
    """Room for a store's warm read buffers: a ``batched_get`` of ``batch`` chunks of the
    metadata's size held at once (with fewer, the rest of each batch page-faulted fresh
    memory: 16 hot 32 MiB chunks took 130 ms instead of 57), never below ``READ_POOL_BYTES``.
    Retained only once that many are held at the same time, so not a second cache."""
    fixed = fixed_chunk_shape(metadata)
    if fixed is None:
        return READ_POOL_BYTES
    shape, dtype = fixed
    n = 1
    for d in shape:
        n *= d
    return max(batch * n * dtype.itemsize, READ_POOL_BYTES)


def shared_pool(name: str, max_bytes: int) -> BufferPool:
    """The process's CPU pool called ``name``, made on first use with ``max_bytes``.

    ``max_bytes`` is the first caller's: later calls get the same pool whatever they pass.

    For connectors that read large replies straight into warm memory (Redis
    replies, S3 bodies): a reply's buffer is free again once the last tensor
    decoded over it is dropped. A forked child starts with none. Thread-safe.
    """
    pool = _shared.get(name)
    if pool is None:
        with _shared_lock:
            pool = _shared.get(name)
            if pool is None:
                pool = _shared[name] = BufferPool("cpu", max_bytes=max_bytes)
    return pool


def _forget_shared_after_fork() -> None:
    # A lock that another parent thread held at fork() stays held in the child.
    global _shared, _shared_lock
    _shared = {}
    _shared_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_after_fork)
