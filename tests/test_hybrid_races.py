"""Hybrid read-through fills and prefetch racing writes of the same key, and the hybrid in a
forked child.

A fill copies what a slower tier returned into the faster ones. A ``put`` or ``remove`` of
the key that begins while that read is under way must win: the fill is dropped, so no tier
is left holding the older chunk and a removed key does not come back. Each race is forced
with a gate (an ``Event``) that holds the slower tier's read after it has read, so nothing
depends on timing.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend
from tests.conftest import make_key
from tests.test_last_write_budget_fills_and_fork import run_in_child

META = LMCacheEngineMetadata(model_name="test/model")
SHAPE = (2, 2, 16, 2, 8)
WAIT_S = 30.0
OLD, NEW = 1, 2


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).half()


def version(t: torch.Tensor | None) -> int | None:
    """Which chunk ``t`` is: OLD, NEW, None for a miss (anything else fails the test)."""
    if t is None:
        return None
    for seed in (OLD, NEW):
        if torch.equal(t.cpu(), chunk(seed)):
            return seed
    raise AssertionError("a tier holds a chunk that was never put")


def redis_url(server: Any, tag: str) -> str:
    return f"{server.url}?prefix={tag}:"


def local_hybrid(tmp_path: Any) -> LMCHybridBackend:
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu", local_disk=str(tmp_path / "disk"), max_local_cache_size=0.05
    )
    return LMCHybridBackend(cfg, META, None, "cpu")


def tiered_hybrid(tmp_path: Any, url: str, **fields: Any) -> LMCHybridBackend:
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu", local_disk=str(tmp_path / "disk"), max_local_cache_size=0.05, remote_url=url, **fields
    )
    return LMCHybridBackend(cfg, META, None, "cpu")


def remote_only(url: str) -> LMCRemoteBackend:
    return LMCRemoteBackend(LMCacheEngineConfig.from_defaults(remote_url=url), META, "cpu")


def reopened_disk(tmp_path: Any) -> LMCLocalDiskBackend:
    """The disk tier's directory opened afresh: what the disk tier persisted."""
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path / "disk"))
    return LMCLocalDiskBackend(cfg, None, "cpu")


def tiers(backend: LMCHybridBackend) -> tuple[LMCLocalBackend, LMCLocalDiskBackend]:
    named = dict(backend.local_tiers)
    memory, disk = named["memory"], named["disk"]
    assert isinstance(memory, LMCLocalBackend) and isinstance(disk, LMCLocalDiskBackend)
    return memory, disk


class Gate:
    """Holds calls of wrapped functions (those ``when`` selects) until ``open()``.

    ``entered`` is set once such a call waits. Opened at teardown too, so a failing test
    never leaves a thread stuck.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def open(self) -> None:
        self.opened.set()

    def hold(self) -> None:
        self.entered.set()
        assert self.opened.wait(WAIT_S), "gate never opened"

    def after(self, fn: Callable[..., Any], when: Callable[[], bool] = lambda: True) -> Callable[..., Any]:
        """``fn`` that, once it has returned its result, waits at the gate: the read is done
        and the caller holds its (soon older) chunk."""

        def gated(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if when():
                self.hold()
            return result

        return gated

    def before(self, fn: Callable[..., Any], when: Callable[[], bool] = lambda: True) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            if when():
                self.hold()
            return fn(*args, **kwargs)

        return gated


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()


def read(backend: LMCHybridBackend, how: str, key: Any) -> torch.Tensor | None:
    return backend.get(key) if how == "get" else backend.batched_get([key])[0]


def race(backend: LMCHybridBackend, how: str, key: Any, gate: Gate, write: Callable[[], object]) -> None:
    """Read ``key`` on another thread; while its slower tier's read is held at ``gate``,
    run ``write`` to its end; then let the read (and its fill) finish."""
    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read, backend, how, key)
        assert gate.entered.wait(WAIT_S), "the read never reached the gated tier"
        write()
        gate.open()
        got = reader.result(WAIT_S)
    assert version(got) == OLD  # read before the write: the old chunk is a fair answer


# -- a fill from the disk tier --------------------------------------------------------------


@pytest.mark.parametrize("how", ["get", "batched_get"])
def test_disk_hit_fill_loses_to_a_put_made_during_the_read(tmp_path, gate, how) -> None:
    """Found by audit: the memory tier was left holding the older chunk (memory V1, disk V2,
    and every later get answered V1)."""
    backend = local_hybrid(tmp_path)
    memory, disk = tiers(backend)
    key = make_key("disk-put")
    disk.put(key, chunk(OLD))  # on disk only, as after a restart
    setattr(disk, how, gate.after(getattr(disk, how)))
    race(backend, how, key, gate, lambda: backend.put(key, chunk(NEW)))
    assert version(memory.peek(key)) == NEW
    assert version(disk.get(key)) == NEW
    assert version(backend.get(key)) == NEW
    backend.close()


@pytest.mark.parametrize("how", ["get", "batched_get"])
def test_disk_hit_fill_does_not_resurrect_a_key_removed_during_the_read(tmp_path, gate, how) -> None:
    """Found by audit: the fill put the removed chunk back in the memory tier."""
    backend = local_hybrid(tmp_path)
    memory, disk = tiers(backend)
    key = make_key("disk-remove")
    disk.put(key, chunk(OLD))
    setattr(disk, how, gate.after(getattr(disk, how)))
    race(backend, how, key, gate, lambda: backend.remove(key))
    assert memory.peek(key) is None
    assert not backend.contains(key)
    assert backend.get(key) is None
    backend.close()


# -- a fill from the remote tier (the disk fill is a queued write) --------------------------


def hybrid_over_a_gated_remote(
    tmp_path: Any, redis_server: Any, tag: str, key: Any, how: str, gate: Gate
) -> tuple[str, LMCHybridBackend]:
    """(url, hybrid) whose remote holds ``key`` as OLD, its ``how`` read held at ``gate``."""
    url = redis_url(redis_server, f"{tag}-{tmp_path.name}")
    with remote_only(url) as writer:
        writer.put(key, chunk(OLD))
    backend = tiered_hybrid(tmp_path, url)
    remote = backend.remote
    assert remote is not None
    setattr(remote, how, gate.after(getattr(remote, how)))
    return url, backend


@pytest.mark.parametrize("how", ["get", "batched_get"])
def test_remote_hit_fill_loses_to_a_put_made_during_the_read(tmp_path, redis_server, gate, how) -> None:
    """Found by audit: the queued disk fill got a later sequence number than the put, so the
    older chunk overwrote the newer one on disk, where it persisted."""
    key = make_key("remote-put")
    url, backend = hybrid_over_a_gated_remote(tmp_path, redis_server, "race-put", key, how, gate)
    memory, _ = tiers(backend)
    race(backend, how, key, gate, lambda: backend.put(key, chunk(NEW)))
    assert version(memory.peek(key)) == NEW
    assert version(backend.get(key)) == NEW
    backend.close()  # drains the disk tier's queued writes
    with reopened_disk(tmp_path) as persisted:
        assert version(persisted.get(key)) == NEW
    with remote_only(url) as fresh:
        assert version(fresh.get(key)) == NEW


@pytest.mark.parametrize("how", ["get", "batched_get"])
def test_remote_hit_fill_does_not_resurrect_a_key_removed_during_the_read(
    tmp_path, redis_server, gate, how
) -> None:
    key = make_key("remote-remove")
    _, backend = hybrid_over_a_gated_remote(tmp_path, redis_server, "race-rm", key, how, gate)
    memory, _ = tiers(backend)
    race(backend, how, key, gate, lambda: backend.remove(key))
    assert memory.peek(key) is None
    assert not backend.contains(key)
    backend.close()
    with reopened_disk(tmp_path) as persisted:
        assert persisted.get(key) is None


def hold_disk_writers(monkeypatch: pytest.MonkeyPatch, until: threading.Event) -> None:
    """Disk tiers opened from now on start writing only once ``until`` is set."""
    real_worker = LMCLocalDiskBackend.put_worker

    def held_worker(self: LMCLocalDiskBackend) -> None:
        assert until.wait(WAIT_S)
        real_worker(self)

    monkeypatch.setattr(LMCLocalDiskBackend, "put_worker", held_worker)


def test_a_put_made_after_a_disk_fill_was_queued_still_wins(tmp_path, redis_server, monkeypatch) -> None:
    """The other order: the fill is queued on the disk tier first (its writers held), then a
    put of the key runs. The put's write is submitted later, so it must be the one kept."""
    writers = threading.Event()
    hold_disk_writers(monkeypatch, writers)
    url = redis_url(redis_server, f"race-queued-{tmp_path.name}")
    key = make_key("queued")
    with remote_only(url) as writer:
        writer.put(key, chunk(OLD))
    backend = tiered_hybrid(tmp_path, url)
    memory, _ = tiers(backend)
    try:
        assert version(backend.get(key)) == OLD  # fills memory now, queues the disk fill
        backend.put(key, chunk(NEW))
    finally:
        writers.set()
    assert version(memory.peek(key)) == NEW
    backend.close()
    with reopened_disk(tmp_path) as persisted:
        assert version(persisted.get(key)) == NEW


# -- prefetch ------------------------------------------------------------------------------


def prefetching_hybrid_held_at_gate(
    tmp_path: Any, redis_server: Any, tag: str, key: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, LMCHybridBackend]:
    """(url, hybrid) prefetching ``key`` (OLD in the remote), its remote read held at ``gate``."""
    url = redis_url(redis_server, f"{tag}-{tmp_path.name}")
    with remote_only(url) as writer:
        writer.put(key, chunk(OLD))
    on_prefetch_thread = lambda: threading.current_thread().name == "lmcache-prefetch"  # noqa: E731
    monkeypatch.setattr(LMCRemoteBackend, "get", gate.after(LMCRemoteBackend.get, when=on_prefetch_thread))
    return url, tiered_hybrid(tmp_path, url, prefetch=True)


@pytest.mark.parametrize("write", ["put", "remove"])
def test_prefetch_loses_to_a_write_made_during_its_remote_read(
    tmp_path, redis_server, gate, monkeypatch, write
) -> None:
    """Prefetch copied the chunk it had read over a newer local put, or back after a remove."""
    key = make_key("prefetched")
    url, backend = prefetching_hybrid_held_at_gate(tmp_path, redis_server, f"race-pf-{write}", key, gate, monkeypatch)
    memory, _ = tiers(backend)
    assert gate.entered.wait(WAIT_S), "prefetch never read the chunk"
    if write == "put":
        backend.put(key, chunk(NEW))
    else:
        assert backend.remove(key)
    gate.open()
    assert backend.prefetch_done.wait(WAIT_S)
    expected = NEW if write == "put" else None
    assert version(memory.peek(key)) == expected
    assert version(backend.get(key)) == expected
    backend.close()
    with reopened_disk(tmp_path) as persisted:
        assert version(persisted.get(key)) == expected


# -- the hybrid in a forked child ----------------------------------------------------------


def test_forked_child_uses_the_hybrid_although_a_parent_thread_held_its_stats_lock(tmp_path) -> None:
    """Found by audit: the hybrid kept the parent's counters lock in a child, so with a
    parent thread inside ``stats.incr`` at fork() every get and put in the child hung."""
    backend = local_hybrid(tmp_path)
    key, child_key = make_key("parent"), make_key("child")
    backend.put(key, chunk(OLD))

    def child() -> None:
        assert version(backend.get(key)) == OLD
        assert backend.stats["hits_memory"] == 1  # the child's own counters
        backend.put(child_key, chunk(NEW))
        assert [version(t) for t in backend.batched_get([key, child_key])] == [OLD, NEW]
        assert backend.remove(child_key)
        assert not backend.contains(child_key)
        backend.close()

    with backend.stats._lock:  # as if a parent thread held it at fork()
        code = run_in_child(child)
    assert code == 0
    assert version(backend.get(key)) == OLD
    backend.close()


def test_forked_child_writes_a_key_whose_fill_a_parent_thread_was_doing_at_fork(tmp_path, gate) -> None:
    """A parent thread inside a fill at fork() (here: held in the memory tier's copy) holds
    the hybrid's lock for that key; the child must not wait for it."""
    backend = local_hybrid(tmp_path)
    memory, disk = tiers(backend)
    key = make_key("filling")
    disk.put(key, chunk(OLD))
    parent = threading.get_ident()
    memory.put = gate.before(memory.put, when=lambda: threading.get_ident() != parent)  # type: ignore[method-assign]

    def child() -> None:
        backend.put(key, chunk(NEW))
        assert version(backend.get(key)) == NEW
        assert backend.remove(key)
        backend.close()

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(backend.get, key)
        assert gate.entered.wait(WAIT_S)
        code = run_in_child(child)
        gate.open()
        assert version(reader.result(WAIT_S)) == OLD
    assert code == 0
    backend.close()


def test_forked_child_of_a_prefetching_hybrid_sees_prefetch_done(tmp_path, redis_server, gate, monkeypatch) -> None:
    """The prefetch thread is the parent's: in a child nothing would ever set ``prefetch_done``."""
    key = make_key("prefetched")
    url, backend = prefetching_hybrid_held_at_gate(tmp_path, redis_server, "fork-pf", key, gate, monkeypatch)
    assert gate.entered.wait(WAIT_S)  # prefetch is under way in the parent

    def child() -> None:
        assert backend.prefetch_done.wait(5)
        assert version(backend.get(key)) == OLD  # read through from the remote
        backend.close()

    code = run_in_child(child)
    gate.open()
    assert code == 0
    assert backend.prefetch_done.wait(WAIT_S)
    backend.close()


# -- a tier that refuses a newer chunk drops the older one --------------------------------


def test_a_chunk_over_the_memory_budget_does_not_leave_the_older_one_served(tmp_path) -> None:
    """The memory tier refused the new chunk (over its budget) and kept serving the old
    one: get answered from memory with a chunk older than the put just acknowledged."""
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu",
        local_disk=str(tmp_path / "disk"),
        max_local_cache_size=2 * chunk(OLD).nbytes / 1024**3,
        max_local_disk_size=0.05,
    )
    backend = LMCHybridBackend(cfg, META, None, "cpu")
    key = make_key("grows")
    backend.put(key, chunk(OLD))
    bigger = torch.cat([chunk(NEW)] * 4)  # 4x: over the memory budget, within the disk's
    backend.put(key, bigger)
    memory, disk = tiers(backend)
    assert not memory.contains(key)
    got = backend.get(key)
    assert got is not None and torch.equal(got, bigger)
    backend.close()


def test_a_failed_disk_write_does_not_leave_the_older_file_served(tmp_path) -> None:
    """The disk tier failed to write the new chunk (ENOSPC) and kept the old file: once
    the memory tier evicted the new one, get served the old chunk from disk."""
    import errno

    from lmcache_core.storage_backend import disk_io

    backend = local_hybrid(tmp_path)
    key = make_key("rewritten")
    backend.put(key, chunk(OLD))

    def disk_full(op: str, path: str) -> None:
        if op == "write":
            raise OSError(errno.ENOSPC, "No space left on device", path)

    with disk_io.fault_hook(disk_full):
        backend.put(key, chunk(NEW))  # stored in memory: acknowledged
    memory, disk = tiers(backend)
    assert not disk.contains(key)
    memory.remove(key)  # as an eviction would
    assert version(backend.get(key)) is None  # a miss, never the older chunk
    backend.close()


def test_a_disk_fill_is_skipped_not_waited_for_when_the_disk_is_behind(tmp_path, redis_server, monkeypatch) -> None:
    """A get that found its chunk in the remote must not wait for room in a full disk
    write queue to fill the disk tier: the fill is best effort."""
    held = threading.Event()
    hold_disk_writers(monkeypatch, held)
    url = redis_url(redis_server, f"backlog-{tmp_path.name}")
    with remote_only(url) as writer:
        writer.put(make_key(1), chunk(OLD))
        writer.put(make_key(2), chunk(NEW))
    backend = tiered_hybrid(tmp_path, url)
    memory, disk = tiers(backend)
    disk.max_queued_bytes = chunk(OLD).nbytes  # room for one queued chunk
    assert version(backend.get(make_key(1))) == OLD  # its disk fill is queued (the writers are held)
    assert version(backend.get(make_key(2))) == NEW  # returns: no room, no wait
    assert backend.stats["fills_skipped_backlog"] == 1
    held.set()
    backend.close()
    with reopened_disk(tmp_path) as d:
        assert version(d.get(make_key(1))) == OLD and d.get(make_key(2)) is None


def test_prefetch_waits_for_a_disk_that_is_behind_and_counts_only_what_it_copied(tmp_path, monkeypatch) -> None:
    """Prefetch's disk fills were skipped like a get's when the disk's write queue was full,
    yet each was counted in ``prefetched`` (and spent the budget): prefetch ended with the
    chunks never copied. Prefetch has no caller to hold up, so it waits for room."""
    writers = threading.Event()
    hold_disk_writers(monkeypatch, writers)
    defaults = dict(LMCLocalDiskBackend.__init__.__kwdefaults__ or {})
    monkeypatch.setattr(LMCLocalDiskBackend.__init__, "__kwdefaults__", {**defaults, "max_queued_bytes": 1})
    url = f"fsspec+file://{tmp_path / 'remote'}"
    keys = [make_key(f"pf{i}") for i in range(6)]
    with remote_only(url) as writer:
        for k in keys:
            writer.put(k, chunk(OLD))
    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.05, remote_url=url, prefetch=True
    )
    backend = LMCHybridBackend(cfg, META, None, "cpu")
    assert not backend.prefetch_done.wait(1.0)  # one chunk queued, the writers held: waiting for room
    writers.set()
    assert backend.prefetch_done.wait(WAIT_S)
    assert backend.prefetched == len(keys) and backend.stats["fills_skipped_backlog"] == 0
    backend.close()
    with reopened_disk(tmp_path) as d:
        assert all(version(d.get(k)) == OLD for k in keys)
