"""Regression tests for defects found in the fourth audit of the memory tier
(``LMCLocalBackend``, its buffer pool and LRU index)."""

from __future__ import annotations

import gc
import weakref

import torch

from lmcache_core import LMCacheEngineConfig, chunk_format
from lmcache_core.storage_backend.local_backend import LMCLocalBackend
from lmcache_core.storage_backend.mem_pool import BufferPool
from tests.conftest import make_key
from tests.test_mem_pool import _pinned_pool

GB = 1024**3


def memory(budget_bytes: int, metadata: object = None) -> LMCLocalBackend:
    cfg = LMCacheEngineConfig.from_defaults(max_local_cache_size=budget_bytes / GB)
    return LMCLocalBackend(cfg, metadata, "cpu")  # type: ignore[arg-type]


def test_regression_get_after_a_queued_overwrite_reads_the_new_value():
    # get answered from the stored chunk before looking at the queued put: an
    # overwrite with blocking=False read back the old value until the worker ran.
    backend = memory(1 << 20)
    key = make_key(0)
    old, new = torch.zeros(64), torch.arange(64.0)
    backend.put(key, old)
    with backend._pool._lock:  # the worker cannot take a buffer: the put stays queued
        backend.put(key, new, blocking=False)
        got = backend.get(key)
        header = backend.read_header(key)
    assert got is not None and torch.equal(got, new)
    assert header is not None
    assert (
        header.checksum
        == chunk_format.parse_header(chunk_format.encode_header(new, key.to_string())).checksum
    )
    backend.close()
    stored = backend.get(key)
    assert stored is not None and torch.equal(stored, new)


def test_regression_list_info_names_the_keys_list_names():
    # list() named queued puts of new keys; list_info() (what the hybrid's and the
    # CLI's listings use) left them out.
    backend = memory(1 << 20)
    backend.put(make_key(0), torch.zeros(8))
    with backend._pool._lock:
        backend.put(make_key(1), torch.zeros(16), blocking=False)
        infos = {info.key: info.size for info in backend.list_info()}
        listed = set(backend.list())
    assert set(infos) == listed == {make_key(0), make_key(1)}
    assert infos[make_key(1)] == 16 * 4
    backend.close()


def _held_bytes(backend: LMCLocalBackend) -> int:
    """Memory the tier holds: the pool's retained buffers plus stored chunks outside them."""
    pool = backend._pool
    pooled = {buf.data_ptr() for buf, _ in pool._by_ptr.values()}
    outside = 0
    for key in backend.list():
        stored = backend.peek(key)
        assert stored is not None
        if stored.untyped_storage().data_ptr() not in pooled:
            outside += stored.untyped_storage().nbytes()
    return pool.stats()["retained_bytes"] + outside


def test_regression_chunks_of_a_new_size_do_not_double_the_memory_held():
    # The pool kept every buffer it had retained: filled by 64 KiB chunks, it held the
    # whole budget idle while 128 KiB chunks were allocated beside it (2 MiB held for
    # a 1 MiB budget), and so on for every later size.
    budget = 1 << 20
    backend = memory(budget)
    fill: dict[object, int] = {}
    for size in (64 << 10, 128 << 10, 100 << 10, 256 << 10):
        for _ in range(budget // size + 2):
            key = make_key(len(fill))
            fill[key] = len(fill) % 251
            backend.put(key, torch.full((size,), fill[key], dtype=torch.uint8))
        assert backend.used_bytes <= budget
        assert _held_bytes(backend) <= budget
    assert backend.list()
    for key in backend.list():  # and no stored chunk's buffer was handed out again
        stored = backend.get(key)
        assert stored is not None and bool((stored == fill[key]).all())
    backend.close()


def test_reclaim_never_takes_a_buffer_someone_holds():
    pool = BufferPool("cpu", max_bytes=4 * 4096)
    held = [pool.acquire(4096) for _ in range(2)]
    for i, t in enumerate(held):
        t.fill_(i + 1)
    free = [pool.acquire(4096) for _ in range(2)]
    assert pool.retained_bytes == 4 * 4096
    del free
    big = [pool.acquire(8192)]  # room made from the two free 4 KiB buffers only
    assert pool.retained_bytes == 4 * 4096
    big.append(pool.acquire(8192))  # no free buffer left to drop: a plain one
    assert pool.retained_bytes == 4 * 4096
    big[0].fill_(7)
    big[1].fill_(9)
    assert [int(t.min()) for t in held] == [1, 2] and [int(t.max()) for t in held] == [1, 2]
    ptrs = {t.data_ptr() for t in held}
    assert all(b.data_ptr() not in ptrs for b in big)


def test_reclaim_leaves_pinned_slab_slots_alone(monkeypatch):
    # A slab is locked until all its slots go: dropping one slot would free nothing
    # yet count it freed.
    pool, slabs = _pinned_pool(monkeypatch, max_bytes=64 << 10, slab_max=64 << 10)
    slot = pool.acquire(4096)
    assert slabs.owner(slot) == 0 and pool.retained_bytes == 64 << 10
    del slot
    other = pool.acquire(8192)
    assert slabs.owner(other) is None and pool.retained_bytes == 64 << 10


def test_regression_a_chunk_that_requires_grad_is_stored_as_bytes_alone():
    # copy_ from a tensor requiring grad made the stored chunk part of the caller's
    # autograd graph: get returned a tensor with a grad_fn, and the cache kept the
    # caller's tensor (and all its graph) alive, outside the budget, while stored.
    for blocking in (True, False):
        backend = memory(1 << 20)
        src = torch.randn(256, requires_grad=True)
        expected = src.detach() * 2
        alive = weakref.ref(src)
        backend.put(make_key(0), src * 2, blocking=blocking)
        first = backend.get(make_key(0))  # queued or stored
        assert first is not None and not first.requires_grad and first.grad_fn is None
        backend.close()
        del src, first
        gc.collect()
        assert alive() is None
        got = backend.get(make_key(0))
        assert got is not None and torch.equal(got, expected)
        assert not got.requires_grad and got.grad_fn is None


def test_regression_in_place_changes_to_a_got_tensor_leave_the_stored_chunk_alone():
    # get handed out the stored tensor object itself: unsqueeze_ or requires_grad_ on
    # the caller's result changed the shape or autograd state of every later get.
    backend = memory(1 << 20)
    key = make_key(1)
    backend.put(key, torch.arange(6.0).reshape(2, 3))
    first = backend.get(key)
    assert first is not None
    first.unsqueeze_(0)
    first.requires_grad_()
    again = backend.get(key)
    assert again is not None
    assert again.shape == (2, 3) and not again.requires_grad
    assert torch.equal(again, torch.arange(6.0).reshape(2, 3))
    assert again.data_ptr() == first.data_ptr()  # still zero-copy
    backend.close()
