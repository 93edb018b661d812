"""Regressions from the backend review: the last submitted write wins in the memory tier,
eviction keeps the budget counting the chunk just added, hybrid fills never store the
tensor handed to the caller, a reassigned ``dst_device`` reaches every hybrid tier, and
the memory and disk tiers work in a forked child.

Background writers are held at a gate (an ``Event``) where a test needs writes queued,
so nothing depends on timing; forked children are waited for with a timeout, so a
regression fails instead of hanging.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from typing import Callable, Iterator

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend import CreateStorageBackend, abstract_backend
from lmcache_core.storage_backend.evictor import LRUIndex
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.local_backend import (
    LMCLocalBackend,
    LMCLocalDiskBackend,
    chunk_file_size,
)
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend
from tests.conftest import make_key

GB = 1024**3
META = LMCacheEngineMetadata(model_name="test/model")
SHAPE = (2, 2, 16, 2, 8)
CHILD_TIMEOUT_S = 60.0


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).half()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory(budget_bytes: int = 64 << 20) -> LMCLocalBackend:
    cfg = LMCacheEngineConfig.from_defaults(local_device="cpu", max_local_cache_size=budget_bytes / GB)
    return LMCLocalBackend(cfg, None, "cpu")


def disk(root: object, budget_bytes: int = 64 << 20) -> LMCLocalDiskBackend:
    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=str(root), max_local_disk_size=budget_bytes / GB
    )
    return LMCLocalDiskBackend(cfg, None, "cpu")


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Memory and disk put workers started from now on wait for this event before working.

    Set at teardown too, so a failing test never leaves a worker (and its close) stuck.
    """
    event = threading.Event()
    for cls in (LMCLocalBackend, LMCLocalDiskBackend):
        original = cls.put_worker

        def gated(self: object, _original: Callable[[object], None] = original) -> None:
            event.wait()
            _original(self)

        monkeypatch.setattr(cls, "put_worker", gated)
    yield event
    event.set()


def run_in_child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child; its exit code (0: passed), failing the test if it hangs."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        # Dies on its own if it hangs, even if the parent is stopped first (pytest-timeout).
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(CHILD_TIMEOUT_S) + 30)
        code = 1
        try:
            body()
            code = 0
        except BaseException:  # noqa: BLE001 - reported on stderr, exit code says it failed
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.02)


# -- the last submitted write of a key wins ---------------------------------------------


@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_blocking_put_supersedes_an_older_queued_nonblocking_put(tier, tmp_path, gate) -> None:
    backend = memory() if tier == "memory" else disk(tmp_path)
    key = make_key("superseded")
    backend.put(key, chunk(1), blocking=False)  # queued behind the gate
    backend.put(key, chunk(2), blocking=True)
    assert torch.equal(backend.get(key), chunk(2))
    gate.set()
    backend.close()  # drains the older queued write: it must not land over the newer one
    if tier == "disk":
        backend = disk(tmp_path)
    assert torch.equal(backend.get(key), chunk(2))
    backend.close()


def test_memory_nonblocking_put_after_a_blocking_put_still_wins(gate) -> None:
    backend = memory()
    key = make_key("newest")
    backend.put(key, chunk(1), blocking=False)
    backend.put(key, chunk(2), blocking=True)
    backend.put(key, chunk(3), blocking=False)  # submitted last: it wins
    gate.set()
    backend.close()
    assert torch.equal(backend.get(key), chunk(3))


# -- budgets hold counting the chunk just added ------------------------------------------


def test_a_queued_memory_put_removed_before_it_ran_evicts_nothing(gate) -> None:
    """The queued write made room (evicting an LRU chunk) before it found it had been
    removed: a full cache lost a chunk for a write that never landed."""
    one = nbytes(chunk(0))
    m = memory(budget_bytes=3 * one)
    m.put(make_key(1), chunk(1))
    m.put(make_key(2), chunk(2))
    m.put(make_key(3), chunk(3), blocking=False)  # queued: the worker waits on the gate
    m.remove(make_key(3))
    m.put(make_key(4), chunk(4))  # the cache is full
    gate.set()
    m.close()
    assert m.stats["evictions"] == 0
    assert set(m.list()) == {make_key(1), make_key(2), make_key(4)}


def test_eviction_after_add_counts_the_entry_just_added() -> None:
    index: LRUIndex[str] = LRUIndex(100)
    index.add("a", 40)
    index.add("b", 40)
    index.add("c", 40)  # added past the budget (as concurrent puts or a learnt file do)
    assert index.victims_over_budget(keep="c") == ["a"]
    index.add("big", 100)  # alone it fits: everything else goes, never the entry just added
    assert index.victims_over_budget(keep="big") == ["a", "b", "c"]


def test_disk_budget_holds_after_learning_another_process_chunk(tmp_path) -> None:
    one = chunk_file_size(chunk(0), make_key(0).to_string())
    mine = disk(tmp_path, budget_bytes=2 * one + 1)
    other = disk(tmp_path)  # another process sharing the directory
    try:
        mine.put(make_key(1), chunk(1))
        mine.put(make_key(2), chunk(2))
        other.put(make_key(3), chunk(3))
        assert torch.equal(mine.get(make_key(3)), chunk(3))  # learnt, then evicted down to budget
        assert mine.used_bytes <= 2 * one + 1
        assert mine.contains(make_key(3)) and not os.path.exists(mine._path(make_key(1)))
    finally:
        mine.close()
        other.close()


def test_memory_budget_holds_after_concurrent_puts() -> None:
    one = nbytes(chunk(0))
    backend = memory(budget_bytes=2 * one)
    backend.put(make_key(0), chunk(0))
    # Two puts both make room before either adds its chunk (the barrier holds each in
    # its buffer allocation until the other got there): three chunks for two places.
    barrier = threading.Barrier(2, timeout=CHILD_TIMEOUT_S)
    acquire = backend._pool.acquire
    calls = iter(range(1 << 30))

    def acquire_together(n: int) -> torch.Tensor:
        if next(calls) < 2:
            barrier.wait()
        return acquire(n)

    backend._pool.acquire = acquire_together  # type: ignore[method-assign]
    threads = [threading.Thread(target=backend.put, args=(make_key(i), chunk(i))) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.used_bytes <= 2 * one
    assert len(backend.list()) == 2
    backend.close()


def test_a_memory_put_that_raced_close_is_refused_not_queued_past_the_end() -> None:
    """A put(blocking=False) that passed put()'s closed check just before close() ran
    used to queue its chunk behind the worker's end signal: acknowledged, never stored.
    Its second half (put_nonblocking) now checks under the lock close() takes."""
    backend = memory()
    backend.put(make_key(0), chunk(0), blocking=False)
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.put_nonblocking(make_key(1), chunk(1))
    assert torch.equal(backend.get(make_key(0)), chunk(0))  # drained before the end signal
    assert not backend.contains(make_key(1))


# -- hybrid fills never store the caller's tensor ------------------------------------------


def redis_url(server: object, tag: str) -> str:
    return f"{server.url}?prefix={tag}:"  # type: ignore[attr-defined]


@pytest.mark.parametrize("read", ["get", "batched_get"])
@pytest.mark.parametrize("local", ["disk", "memory+disk"])
def test_caller_modifying_a_remote_hit_does_not_change_the_disk_fill(
    local, read, tmp_path, redis_server, gate
) -> None:
    url = redis_url(redis_server, f"alias-{tmp_path.name}-{local}-{read}")
    key = make_key("alias")
    with LMCRemoteBackend(LMCacheEngineConfig.from_defaults(remote_url=url), META, "cpu") as writer:
        writer.put(key, chunk(5))
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu" if "memory" in local else None,
        local_disk=str(tmp_path / "disk"),
        remote_url=url,
    )
    backend = CreateStorageBackend(cfg, META, "cpu")
    assert isinstance(backend, LMCHybridBackend)
    got = backend.get(key) if read == "get" else backend.batched_get([key])[0]
    assert got is not None and torch.equal(got, chunk(5))
    got.zero_()  # allowed: e.g. a staging buffer the caller reuses
    gate.set()  # the disk fill, queued meanwhile, is written now
    backend.close()
    with disk(tmp_path / "disk") as reopened:
        stored = reopened.get(key)
    assert stored is not None and torch.equal(stored, chunk(5))


# -- a reassigned dst_device reaches every tier ------------------------------------------


def test_hybrid_dst_device_reassignment_reaches_every_tier(tmp_path, redis_server, monkeypatch) -> None:
    # "meta" stands in for a second device on a CPU-only host; a real store refuses it.
    real = abstract_backend.resolve_device
    monkeypatch.setattr(abstract_backend, "resolve_device", lambda d, *a: torch.device(d) if d == "meta" else real(d, *a))
    url = redis_url(redis_server, f"dst-{tmp_path.name}")
    cfg = LMCacheEngineConfig.from_defaults(local_device="cpu", local_disk=str(tmp_path / "disk"), remote_url=url)
    backend = CreateStorageBackend(cfg, META, "cpu")
    assert isinstance(backend, LMCHybridBackend)
    try:
        in_memory, on_disk = make_key("memory"), make_key("disk")
        backend.put(in_memory, chunk(1))
        dict(backend.local_tiers)["disk"].put(on_disk, chunk(2))
        backend.dst_device = "meta"
        # The memory tier hands out what get returns; the disk and remote tiers read
        # onto the host, so their hits fill the CPU memory tier without a round trip
        # through the device, which get moves them to last.
        assert [(n, t.dst_device) for n, t in backend.tiers()] == [("memory", "meta"), ("disk", "cpu"), ("remote", "cpu")]
        assert backend.get(in_memory).device.type == "meta"
        assert backend.get(on_disk).device.type == "meta"
        memory = dict(backend.local_tiers)["memory"]
        filled = memory.peek(on_disk)  # filled from the host copy (a meta tensor holds no bytes)
        assert filled is not None and torch.equal(filled, chunk(2))
        assert all(t.device.type == "meta" for t in backend.batched_get([in_memory, on_disk]))
        backend.dst_device = "cpu"
        assert [t.dst_device for _, t in backend.tiers()] == ["cpu"] * 3
        assert torch.equal(backend.get(in_memory), chunk(1))
    finally:
        backend.close()


# -- fork safety -------------------------------------------------------------------------


def test_disk_tier_in_a_forked_child_writes_reads_and_drains(tmp_path, gate) -> None:
    backend = disk(tmp_path)
    parent_key, child_key = make_key("parent"), make_key("child")
    backend.put(parent_key, chunk(1), blocking=False)  # in flight (gated) at fork()

    def child() -> None:
        gate.set()  # this process's copy of the gate: opens the child's own writers only
        # The parent's queued write is the parent's: waiting for it here would never end.
        assert backend.get(parent_key) is None
        backend.put(child_key, chunk(2), blocking=False)
        assert torch.equal(backend.get(child_key), chunk(2))
        backend.put(child_key, chunk(3), blocking=False)
        backend.close()  # drains the child's own writes

    with backend._lock:  # as if a parent thread held it at fork(): the child needs its own
        pid_code = run_in_child(child)
    assert pid_code == 0
    gate.set()
    assert torch.equal(backend.get(parent_key), chunk(1))
    assert torch.equal(backend.get(child_key), chunk(3))
    backend.close()


def test_disk_tier_child_that_only_closes_keeps_its_acknowledged_write(tmp_path) -> None:
    backend = disk(tmp_path)
    key = make_key("acked")

    def child() -> None:
        backend.put(key, chunk(4), blocking=False)
        backend.close()

    assert run_in_child(child) == 0
    with disk(tmp_path) as reopened:
        assert torch.equal(reopened.get(key), chunk(4))
    backend.close()


def test_memory_tier_in_a_forked_child_stores_queued_and_new_writes(gate) -> None:
    backend = memory()
    parent_key, child_key = make_key("parent"), make_key("child")
    backend.put(parent_key, chunk(1), blocking=False)  # acknowledged, still queued at fork()

    def child() -> None:
        gate.set()  # this process's copy of the gate: opens the child's own worker only
        backend.put(child_key, chunk(2), blocking=False)
        backend.close()  # the child's worker stores both: nothing acknowledged is lost
        stored = {info.key for info in backend.list_info()}
        assert stored == {parent_key, child_key}
        assert backend.used_bytes == 2 * nbytes(chunk(0))
        assert torch.equal(backend.get(parent_key), chunk(1))
        assert torch.equal(backend.get(child_key), chunk(2))

    with backend._lock:  # as if a parent thread held it at fork(): the child needs its own
        code = run_in_child(child)
    assert code == 0
    gate.set()
    backend.close()
    assert {info.key for info in backend.list_info()} == {parent_key}


# -- a bounded disk write queue ------------------------------------------------------------


def test_disk_non_blocking_puts_wait_for_room_in_a_bounded_queue(tmp_path, gate) -> None:
    """The disk writers' queue had no bound: in front of a disk slower than the puts,
    queued chunks grew until the process ran out of memory."""
    one = nbytes(chunk(0))
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path), max_local_disk_size=0.01)
    d = LMCLocalDiskBackend(cfg, None, "cpu", max_queued_bytes=2 * one)
    assert d.put_nonblocking(make_key(0), chunk(0)) and d.put_nonblocking(make_key(1), chunk(1))
    assert d.put_nonblocking(make_key(2), chunk(2), wait=False) is False  # full: a fill would skip
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (d.put(make_key(2), chunk(2), blocking=False), returned.set()))
    waiter.start()
    assert not returned.wait(0.5)  # waiting for room, not queued
    gate.set()  # the disk catches up
    assert returned.wait(30)
    waiter.join()
    d.close()
    again = disk(tmp_path)
    assert all(torch.equal(again.get(make_key(i)), chunk(i)) for i in range(3))
    again.close()


def test_close_wakes_a_disk_put_waiting_for_room(tmp_path, gate) -> None:
    one = nbytes(chunk(0))
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path), max_local_disk_size=0.01)
    d = LMCLocalDiskBackend(cfg, None, "cpu", max_queued_bytes=one)
    d.put(make_key(0), chunk(0), blocking=False)
    errors: list[BaseException] = []

    def waiting_put() -> None:
        try:
            d.put(make_key(1), chunk(1), blocking=False)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    waiter = threading.Thread(target=waiting_put)
    waiter.start()
    deadline = time.monotonic() + 10
    while d.stats["put_backpressure_waits"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d.stats["put_backpressure_waits"] == 1
    closer = threading.Thread(target=d.close)
    closer.start()
    waiter.join(10)
    assert not waiter.is_alive() and len(errors) == 1 and isinstance(errors[0], RuntimeError)
    gate.set()
    closer.join(30)
    assert not closer.is_alive()
    again = disk(tmp_path)
    assert torch.equal(again.get(make_key(0)), chunk(0)) and again.get(make_key(1)) is None  # the acknowledged one landed
    again.close()
