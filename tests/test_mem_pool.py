"""BufferPool reuse: warm buffers come back, hinted ones in O(1), held ones never."""

from __future__ import annotations

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
