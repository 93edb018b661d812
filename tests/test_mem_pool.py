"""BufferPool reuse: warm buffers come back, hinted ones in O(1), held ones never."""

from __future__ import annotations

import pytest
import torch

from lmcache_core.storage_backend import mem_pool
from lmcache_core.storage_backend.mem_pool import BufferPool


def test_released_buffer_is_reused_without_scanning(monkeypatch):
    pool = BufferPool("cpu", max_bytes=1 << 20)
    held = [pool.acquire(100) for _ in range(500)]
    victim = held.pop(250)
    ptr = victim.data_ptr()
    pool.release(victim)
    del victim
    calls = 0
    real = mem_pool._use_count

    def counting(t: torch.Tensor) -> int:
        nonlocal calls
        calls += 1
        return real(t)

    monkeypatch.setattr(mem_pool, "_use_count", counting)
    again = pool.acquire(100)
    assert again.data_ptr() == ptr
    assert calls <= 2  # the hint, not a walk over 500 buffers
    held.append(again)


def test_buffers_in_use_are_never_handed_out_twice():
    pool = BufferPool("cpu", max_bytes=64 * 1000)
    held = [pool.acquire(64) for _ in range(1000)]
    for t in held[::2]:
        pool.release(t)  # a lying hint: the caller still holds it
    more = [pool.acquire(64) for _ in range(200)]
    ptrs = [t.data_ptr() for t in held + more]
    assert len(set(ptrs)) == len(ptrs)


def test_freed_buffers_come_back_warm():
    pool = BufferPool("cpu", max_bytes=10 * 4096)
    first = pool.acquire(4096)
    ptr = first.data_ptr()
    del first
    assert pool.acquire(4096).data_ptr() == ptr
    assert pool.stats()["buffers"] == 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _vm_flags(addr: int) -> list[str] | None:
    """The kernel's VmFlags of the mapping holding ``addr`` (``/proc/self/smaps``), or None."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= addr < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def test_large_cpu_buffers_are_huge_page_mappings_that_are_reused_and_freed():
    if mem_pool._MADV_HUGEPAGE is None:
        pytest.skip("no MADV_HUGEPAGE on this platform: buffers are plain torch allocations")
    pool = BufferPool("cpu", max_bytes=64 << 20)
    assert pool.reserve(1, 8 << 20) == 1
    buf = pool.acquire(8 << 20)
    assert buf.untyped_storage().nbytes() == 8 << 20
    assert buf.data_ptr() % 4096 == 0
    flags = _vm_flags(buf.data_ptr())
    if flags is not None:  # Linux: the kernel was asked for huge pages on this very mapping
        assert "hg" in flags
    buf.fill_(7)
    ptr = buf.data_ptr()
    del buf
    again = pool.acquire(8 << 20)
    assert again.data_ptr() == ptr and int(again[123]) == 7  # the same warm memory
    del again
    small = pool.acquire(4096)
    # Below 2 MiB: a plain allocation, still usable. Not asserted free of "hg": numpy
    # advises huge pages for its large arrays, heap ones included, and a later small
    # malloc can land in that part of the heap (seen once in a full suite run).
    assert small.numel() == 4096
    pool.clear()


def test_huge_page_buffer_round_trips_and_unmaps_when_dropped():
    if mem_pool._MADV_HUGEPAGE is None:
        pytest.skip("no MADV_HUGEPAGE on this platform")
    t = mem_pool.huge_page_buffer(4 << 20)
    assert t is not None and t.numel() == 4 << 20
    t.copy_(torch.arange(4 << 20, dtype=torch.int64).to(torch.uint8))
    assert int(t[257]) == 1
    view = t[10:20]
    del t
    assert int(view[0]) == 10  # a view keeps the mapping alive
    before = _rss_bytes()
    del view
    assert before - _rss_bytes() >= 3 << 20  # the mapping went away with its last view
    assert mem_pool.huge_page_buffer(0) is None


class _PinnedSlabs:
    """Stands in for torch's pinned allocator where there is no CUDA: plain memory, every slab recorded."""

    def __init__(self) -> None:
        self.slabs: list[torch.Tensor] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        slab = torch.empty(nbytes, dtype=torch.uint8)
        self.slabs.append(slab)
        return slab

    def owner(self, t: torch.Tensor) -> int | None:
        p = t.data_ptr()
        for i, s in enumerate(self.slabs):
            if s.data_ptr() <= p < s.data_ptr() + s.numel():
                return i
        return None


def _pinned_pool(monkeypatch, max_bytes: int, slab_max: int = 1 << 20) -> tuple[BufferPool, _PinnedSlabs]:
    slabs = _PinnedSlabs()
    monkeypatch.setattr(mem_pool, "_pinned_empty", slabs)
    monkeypatch.setattr(mem_pool, "_PINNED_SLAB_MAX", slab_max)
    pool = BufferPool("cpu", max_bytes=max_bytes)
    pool.pin_memory = True  # what a CUDA machine sets; the allocator above stands in for it
    return pool, slabs


def test_pinned_buffers_are_carved_from_power_of_two_slabs_within_the_budget(monkeypatch):
    # torch rounds each pinned allocation up to a power of two: 80 KiB buffers one by
    # one would lock 128 KiB each. Slabs of 1 MiB hold 12 of them, and the budget
    # counts what is locked.
    capacity = 80 << 10
    pool, slabs = _pinned_pool(monkeypatch, max_bytes=(1 << 20) + (300 << 10))
    assert pool.reserve(100, capacity) == 15  # 12 from a 1 MiB slab, 3 from a 256 KiB one
    assert [s.numel() for s in slabs.slabs] == [1 << 20, 256 << 10]
    assert pool.retained_bytes == (1 << 20) + (256 << 10) <= pool.max_bytes
    held = [pool.acquire(capacity) for _ in range(15)]
    assert all(slabs.owner(t) is not None for t in held)
    starts = sorted(t.data_ptr() for t in held)
    assert all(b - a >= capacity for a, b in zip(starts, starts[1:], strict=False))  # no two overlap
    for i, t in enumerate(held):
        t.fill_(i)
    assert all(bool((t == i).all()) for i, t in enumerate(held))
    # All 15 held, no slab fits the 44 KiB left: a plain buffer, neither pinned nor retained.
    extra = pool.acquire(capacity)
    assert slabs.owner(extra) is None and len(slabs.slabs) == 2
    assert pool.retained_bytes == (1 << 20) + (256 << 10)
    ptr = held[7].data_ptr()
    del held[7]
    assert pool.acquire(capacity).data_ptr() == ptr  # a freed slot comes back


def test_a_pinned_pool_too_small_for_a_slab_keeps_plain_buffers_within_the_budget(monkeypatch):
    pool, slabs = _pinned_pool(monkeypatch, max_bytes=100 << 10)
    buf = pool.acquire(80 << 10)  # a slab for it would be 128 KiB, over the budget
    assert slabs.slabs == [] and pool.retained_bytes == 80 << 10
    ptr = buf.data_ptr()
    del buf
    assert pool.acquire(80 << 10).data_ptr() == ptr  # retained, warm


def test_a_slot_keeps_its_slab_alive_after_the_pool_forgets_it(monkeypatch):
    pool, slabs = _pinned_pool(monkeypatch, max_bytes=1 << 20)
    slot = pool.acquire(4096)
    slot.fill_(3)
    pool.clear()
    slabs.slabs.clear()  # only the slot's storage refers to the slab now
    assert int(slot.sum()) == 3 * 4096


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory)")
def test_pinned_pool_buffers_are_page_locked_and_within_the_budget():
    pool = BufferPool("cpu", max_bytes=200 << 20, pin_memory=True)
    assert pool.pin_memory
    made = pool.reserve(10, 40 << 20)  # 40 MiB: one at a time, torch would lock 64 MiB each
    assert made == 4 and pool.retained_bytes == 192 << 20  # slabs of 128 MiB (3 slots) and 64 MiB
    bufs = [pool.acquire(40 << 20) for _ in range(made)]
    assert all(b.is_pinned() for b in bufs)
