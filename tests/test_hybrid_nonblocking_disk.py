"""A hybrid's non-blocking put queues its disk write, and a failed background disk
write never leaves the key's older chunk to be served.

Real tiers in temporary directories; ``disk_io``'s fault hooks make the disk slow or
failing for the writer threads only.
"""

from __future__ import annotations

import errno
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import CreateStorageBackend, disk_io
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

SHAPE = (2, 2, 16, 4, 8)  # 8 KiB of fp32
WAIT_S = 10.0


def _key(i: int | str) -> CacheEngineKey:
    return CacheEngineKey("vllm", "test/model", 1, 0, hashlib.sha256(str(i).encode()).hexdigest())


def _chunk(value: float) -> torch.Tensor:
    return torch.full(SHAPE, float(value))


def _hybrid(tmp_path: Path, memory_gb: float = 0.001) -> LMCHybridBackend:
    cfg = LMCacheEngineConfig(
        local_device="cpu", max_local_cache_size=memory_gb, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01
    )
    backend = CreateStorageBackend(cfg, LMCacheEngineMetadata(model_name="test/model"), "cpu")
    assert isinstance(backend, LMCHybridBackend)
    return backend


def _disk(store: LMCHybridBackend) -> LMCLocalDiskBackend:
    return next(t for _, t in store.local_tiers if isinstance(t, LMCLocalDiskBackend))


def _writer_only(hook: Any) -> Any:
    """``hook`` for the disk tier's writer threads only (the test's own reads stay fast)."""

    def only_writers(op: str, path: str) -> None:
        if threading.current_thread().name.startswith("lmcache-disk-put"):
            hook(op, path)

    return only_writers


def test_a_nonblocking_hybrid_put_returns_before_its_disk_write_and_reads_see_it(tmp_path: Path) -> None:
    gate = threading.Event()
    store = _hybrid(tmp_path)
    previous = disk_io.set_fault_hook(_writer_only(lambda op, path: op == "open" and gate.wait(WAIT_S)))
    try:
        started = time.monotonic()
        store.put(_key(1), _chunk(1), blocking=False)  # the disk's writer is held at the gate
        assert time.monotonic() - started < WAIT_S / 2, "the put waited for its disk write"
        disk = _disk(store)
        assert disk.contains(_key(1))  # queued counts
        got = store.get(_key(1))
        assert got is not None and torch.equal(got, _chunk(1))
        # A get of the disk tier itself waits for the queued write, then reads it.
        threading.Timer(0.2, gate.set).start()
        from_disk = disk.get(_key(1))
        assert from_disk is not None and torch.equal(from_disk, _chunk(1))
    finally:
        gate.set()
        disk_io.set_fault_hook(previous)
        store.close()
    reopened = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "disk")), None, "cpu"
    )
    try:
        got = reopened.get(_key(1))
        assert got is not None and torch.equal(got, _chunk(1))
    finally:
        reopened.close()


def test_the_callers_buffer_is_free_once_a_nonblocking_hybrid_put_returns(tmp_path: Path) -> None:
    """The queued disk write reads the memory tier's copy (or a clone), never the caller's buffer."""
    gate = threading.Event()
    for memory_gb in (0.001, 1e-6):  # with the chunk in the memory tier, and too large for it
        store = _hybrid(tmp_path / str(memory_gb), memory_gb)
        previous = disk_io.set_fault_hook(_writer_only(lambda op, path: op == "open" and gate.wait(WAIT_S)))
        try:
            gate.clear()
            buffer = _chunk(3)
            store.put(_key(3), buffer, blocking=False)
            buffer.fill_(8.0)  # reused at once
            gate.set()
            store.close()
        finally:
            gate.set()
            disk_io.set_fault_hook(previous)
        reopened = LMCLocalDiskBackend(
            LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / str(memory_gb) / "disk")), None, "cpu"
        )
        try:
            got = reopened.get(_key(3))
            assert got is not None and torch.equal(got, _chunk(3)), memory_gb
        finally:
            reopened.close()


def test_a_failed_background_disk_write_leaves_a_miss_not_the_older_chunk(tmp_path: Path) -> None:
    store = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "d")), None, "cpu"
    )
    try:
        store.put(_key(1), _chunk(1))  # the older chunk, on disk
        with disk_io.fault_hook(_writer_only(disk_io.Fault("open", errno.EIO))):
            assert store.put_nonblocking(_key(1), _chunk(2))
            assert store.get(_key(1)) is None  # waits for the write, which failed
        assert store.stats["background_put_failures"] == 1
        assert not store.contains(_key(1))
        assert not list((tmp_path / "d").rglob("*.safetensors"))
        store.put(_key(1), _chunk(3))  # the key works again
        got = store.get(_key(1))
        assert got is not None and torch.equal(got, _chunk(3))
    finally:
        store.close()


def test_a_newer_put_committed_before_an_older_write_failed_is_kept(tmp_path: Path) -> None:
    store = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "d")), None, "cpu", put_workers=1
    )
    gate = threading.Event()
    fail = disk_io.Fault("write", errno.EIO)

    def slow_then_failing(op: str, path: str) -> None:
        if op == "open":
            gate.wait(WAIT_S)
        fail(op, path)

    try:
        with disk_io.fault_hook(_writer_only(slow_then_failing)):
            store.put_nonblocking(_key(1), _chunk(1))  # held, then fails
            store.put(_key(1), _chunk(2))  # newer, committed now (this thread is no writer)
            gate.set()
            deadline = time.monotonic() + WAIT_S
            while store.stats["background_put_failures"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        got = store.get(_key(1))
        assert got is not None and torch.equal(got, _chunk(2))
    finally:
        gate.set()
        store.close()


def test_a_hybrid_whose_background_disk_write_failed_serves_no_older_chunk(tmp_path: Path) -> None:
    """The memory tier evicts the new chunk; the disk's write of it failed: a miss, not the old one."""
    store = _hybrid(tmp_path, memory_gb=0.00002)  # 20 kB: two 8 KiB chunks
    try:
        store.put(_key(1), _chunk(1))  # the older chunk, in every tier
        with disk_io.fault_hook(_writer_only(disk_io.Fault("open", errno.EIO))):
            store.put(_key(1), _chunk(2), blocking=False)
            assert _disk(store).get(_key(1)) is None  # waits for the failed write
        for i in range(10, 14):  # the memory tier lets _key(1) go
            store.put(_key(i), _chunk(i))
        got = store.get(_key(1))
        assert got is None or torch.equal(got, _chunk(2)), "the older chunk was served"
    finally:
        store.close()


def test_a_remove_while_an_older_put_commits_leaves_the_key_removed(tmp_path: Path) -> None:
    """A queued put past its stale check, its rename held, while the key is removed.

    The remove used to let go of the key's lock between raising the floor and the
    unlink: the put committed in between, and was kept as if it were newer (the
    removed key came back; seen as a flaky conformance failure of the hybrid)."""
    store = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "d")), None, "cpu", put_workers=1
    )
    at_rename, gate = threading.Event(), threading.Event()

    def held_rename(op: str, path: str) -> None:
        if op == "replace":
            at_rename.set()
            gate.wait(WAIT_S)

    try:
        with disk_io.fault_hook(_writer_only(held_rename)):
            store.put_nonblocking(_key(1), _chunk(1))
            assert at_rename.wait(WAIT_S)  # the writer holds the key's lock, its check passed
            remover = threading.Thread(target=store.remove, args=(_key(1),))
            remover.start()
            time.sleep(0.2)  # the remove is under way (waiting for the key's lock, now)
            gate.set()
            remover.join(WAIT_S)
            assert not remover.is_alive()
        assert not store.contains(_key(1))
        assert store.get(_key(1)) is None
        assert not list((tmp_path / "d").rglob("*.safetensors"))
    finally:
        gate.set()
        store.close()
