"""Interrupt and exception safety: a KeyboardInterrupt landing anywhere in an operation.

Serving processes turn Ctrl-C and SIGTERM into exceptions raised in the main thread
wherever it is. CPython runs signal handlers at a function's start, at a loop's back
edge and right after a call returns, so that is where such an exception can appear.
``_Interrupt`` raises KeyboardInterrupt at the n-th of those points inside an
operation (a profile function sees each Python function start and each return from
a C call, in the main thread only, as signals do), and each test walks n over every
point, or a seeded sample of them, then checks what the interrupted operation left
behind: the interrupt escaping to the caller is expected; a lock left held, a count
never taken back, a store that hangs or serves a wrong tensor is not. One test sends
real SIGINTs from a helper thread at random moments.

The last four tests are regressions of defects this audit found in the memory and
disk tiers (a queue.Queue put interrupted, an LRU index torn, a submit half done, a
close interrupted in its join); each says what went wrong.
"""

# Lambdas here are called at once, inside the iteration that made them (B023 is for
# closures called later).
# ruff: noqa: B023

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import pytest
import torch

from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.key import CacheEngineKey
from lmcache_core.layout import scan_store
from lmcache_core.storage_backend import CreateStorageBackend, mem_pool, open_backend, write_queue
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend
from lmcache_core.storage_backend.mem_pool import BufferPool
from lmcache_core.storage_backend.write_queue import QueuedBytes

SHAPE = (2, 2, 16, 4, 8)  # 8 KiB of fp32
HANG_S = 10.0  # a check that takes longer than this is a hang, not slowness


@pytest.fixture(autouse=True)
def _no_exit_drain_of_stores_left_broken() -> Any:
    """Stores a test leaves open were left broken on purpose (the xfail tests: a lock an
    interrupt never let go): the interpreter's exit drain must not wait on them."""
    before = set(write_queue._open_writers)
    yield
    for backend in set(write_queue._open_writers) - before:
        write_queue.forget_at_exit(backend)


def _key(i: int | str, model: str = "test/model") -> CacheEngineKey:
    # A fresh object each time: dict lookups then compare keys with __eq__, as a server's do.
    return CacheEngineKey("vllm", model, 1, 0, hashlib.sha256(str(i).encode()).hexdigest())


def _chunk(value: float, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.full(shape, float(value))


class _Interrupt:
    """Profile function: KeyboardInterrupt at the n-th interruption point (0: count only).

    ``only``: count only points in frames of files whose name ends with one of these
    (for a 'call', the caller's frame), to aim at one module's own code.
    """

    def __init__(self, n: int, only: tuple[str, ...] = ()) -> None:
        self.n = n
        self.only = only
        self.count = 0
        self.where = ""

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "c_return"):
            return
        if self.only:
            site = frame.f_back if event == "call" else frame
            if site is None or not site.f_code.co_filename.endswith(self.only):
                return
        self.count += 1
        if self.count == self.n:
            self.where = f"{event} {frame.f_code.co_name} {getattr(arg, '__name__', '')}"
            raise KeyboardInterrupt


def _points(fn: Callable[[], Any], only: tuple[str, ...] = ()) -> int:
    probe = _Interrupt(0, only)
    sys.setprofile(probe)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return probe.count


def _interrupted(fn: Callable[[], Any], n: int, only: tuple[str, ...] = ()) -> str | None:
    """Run ``fn`` with a KeyboardInterrupt at point ``n``: where it landed, or None if it ran out."""
    probe = _Interrupt(n, only)
    sys.setprofile(probe)
    try:
        fn()
    except KeyboardInterrupt:
        return probe.where or "?"
    finally:
        sys.setprofile(None)
    return None


def _sample(total: int, k: int, rng: random.Random) -> list[int]:
    points = range(1, total + 1)
    return list(points) if total <= k else sorted(rng.sample(points, k))


def _bounded(fn: Callable[[], Any], timeout: float = HANG_S) -> Any:
    """``fn()`` on a helper thread; a hang fails the test instead of hanging it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {timeout} s (a hang)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _soon(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds (polled)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def _free(lock: Any) -> bool:
    """Whether ``lock`` can be taken (by another thread: a lock this thread left held counts)."""
    return bool(_bounded(lambda: lock.acquire(timeout=2) and (lock.release() or True)))


# -- write queue: a put waiting for room ----------------------------------------------------


class _Counters:
    def incr(self, name: str, n: int = 1) -> None:
        pass


def test_an_interrupt_anywhere_in_a_wait_for_queue_room_leaves_the_lock_held_by_the_waiter() -> None:
    """Regression: ``threading.Condition.wait`` over the backend's plain lock, interrupted in
    its ``_release_save``/``_acquire_restore``, returned with the lock released; the caller's
    ``with lock:`` then released it again: ``RuntimeError: release unlocked lock`` replaced
    the KeyboardInterrupt (2 of 59 points), and had a writer thread taken the lock meanwhile,
    the put released that thread's hold."""
    lock = threading.Lock()
    bad: list[str] = []

    def attempt(n: int) -> int:
        queue = QueuedBytes(lock, max_bytes=10)
        with lock:
            queue.add_locked(8)

        def writer_finishes() -> None:
            time.sleep(0.01)
            with lock:
                queue.done_locked(8)

        writer = threading.Thread(target=writer_finishes)
        writer.start()

        def put() -> None:
            with lock:
                assert queue.wait_for_room_locked(
                    5, stall_s=HANG_S, closed=lambda: False, stalled=OSError, stats=_Counters()
                )
                queue.add_locked(5)

        counted = 0
        try:
            if n == 0:
                counted = _points(put)
            else:
                where = _interrupted(put, n)
                if where is None and queue.queued != 5:
                    bad.append(f"point {n}: ran out but queued {queue.queued}")
        except BaseException as exc:  # anything but the interrupt is the defect
            bad.append(f"point {n}: {exc!r}")
        writer.join(HANG_S)
        if not _free(lock):
            bad.append(f"point {n}: lock left held")
        return counted

    total = attempt(0)
    assert total > 10
    for n in range(1, total + 8):  # a few more: the wait's count varies with the wake-up
        attempt(n)
    assert not bad, bad


# -- buffer pool accounting -----------------------------------------------------------------


def _retained_matches(pool: BufferPool, slabs: list[torch.Tensor] | None = None) -> str:
    """'' when ``retained_bytes`` equals what the pool keeps; else what differs."""
    with pool._lock:
        if slabs is None:
            kept = sum(buf.numel() for ring in pool._free.values() for buf, _ in ring)
            if len(pool._by_ptr) != sum(len(r) for r in pool._free.values()):
                return f"{len(pool._by_ptr)} buffers by address, {sum(len(r) for r in pool._free.values())} kept"
            return "" if kept == pool.retained_bytes else f"retained {pool.retained_bytes}, kept {kept}"
        slots = [buf for ring in pool._free.values() for buf, _ in ring]
        slots += [s for spare in pool._spare.values() for s in spare]
        ptrs = {s.data_ptr() for s in slots}
        kept = 0
        for slab in slabs:
            lo, hi = slab.data_ptr(), slab.data_ptr() + slab.numel()
            inside = [p for p in ptrs if lo <= p < hi]
            if inside:
                kept += slab.numel()
        return "" if kept == pool.retained_bytes else f"retained {pool.retained_bytes}, slabs kept {kept}"


def test_interrupts_anywhere_in_acquire_keep_the_pool_accounting_exact() -> None:
    """Regression: an interrupt between counting a new buffer and keeping it (the ring's
    ``setdefault``) left bytes counted that no buffer held; enough of them and the pool,
    believing itself full, handed every put a fresh allocation. Also covered: reclaiming
    free buffers of another size (its ring was taken out of the pool while scanned)."""
    rng = random.Random(7)
    pool = BufferPool("cpu", max_bytes=64 << 10)
    held: list[torch.Tensor] = []
    bad: list[str] = []
    for step in range(60):
        size = rng.choice([4 << 10, 8 << 10, 12 << 10])
        if rng.random() < 0.5:
            held.clear()  # free buffers, so later acquires reuse or reclaim them
        total = _points(lambda: held.append(pool.acquire(size)))
        for n in range(1, total + 1):  # every point of an acquire in this state
            if rng.random() < 0.3:
                held.clear()
            got: list[torch.Tensor] = []
            where = _interrupted(lambda: got.append(pool.acquire(size)), n)
            held += got
            problem = _retained_matches(pool)
            if problem:
                bad.append(f"step {step}, point {n}/{total} ({where}): {problem}")
                pool.clear()
    assert not bad, bad[:5]
    held.clear()
    # Nothing leaked: the whole budget can be retained again.
    pool.clear()
    assert pool.reserve(16, 4 << 10) == 16


def test_interrupts_anywhere_in_a_pinned_acquire_keep_the_slab_accounting_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    slabs: list[torch.Tensor] = []

    def pinned_empty(nbytes: int) -> torch.Tensor:  # what tests without CUDA use (see test_mem_pool)
        slab = torch.empty(nbytes, dtype=torch.uint8)
        slabs.append(slab)
        return slab

    monkeypatch.setattr(mem_pool, "_pinned_empty", pinned_empty)
    rng = random.Random(8)
    bad: list[str] = []
    for step in range(30):
        held_before = rng.randrange(0, 3)
        for n in range(1, 200):
            pool = BufferPool("cpu", max_bytes=1 << 20)
            pool.pin_memory = True
            slabs.clear()
            held = [pool.acquire(80 << 10) for _ in range(held_before)]
            where = _interrupted(lambda: held.append(pool.acquire(80 << 10)), n)
            problem = _retained_matches(pool, slabs)
            if problem:
                bad.append(f"step {step}, point {n} ({where}): {problem}")
            if where is None:
                break  # ran out of points
    assert not bad, bad[:5]


# -- hybrid: write and read marks, close ----------------------------------------------------


def _hybrid(tmp_path: Path, remote_url: str | None) -> LMCHybridBackend:
    cfg = LMCacheEngineConfig(
        local_device="cpu",
        max_local_cache_size=0.001,
        local_disk=str(tmp_path / "disk"),
        max_local_disk_size=0.002,
        remote_url=remote_url,
        remote_timeout=5.0,
    )
    backend = CreateStorageBackend(cfg, LMCacheEngineMetadata(model_name="test/model"), "cpu")
    assert isinstance(backend, LMCHybridBackend)
    return backend


def _marks_left(store: LMCHybridBackend) -> list[str]:
    left = []
    for i, stripe in enumerate(store._stripes):
        if not _free(stripe.lock):
            left.append(f"stripe {i} lock held")
        # An empty set is no mark (a clean-up the interrupt cut short; the key's next
        # operation takes it again): what counts is a write or read still registered.
        writes = {k: len(v) for k, v in stripe.writes.items() if v}
        reads = {k: len(v) for k, v in stripe.reads.items() if v}
        if writes or reads:
            left.append(f"stripe {i}: writes {writes}, reads {reads}")
    return left


def test_an_interrupted_hybrid_put_get_or_remove_leaves_no_write_or_read_mark(tmp_path: Path, redis_server: Any) -> None:
    """Regression: an interrupt right after ``_begin_write`` counted a put or remove (its
    ``with`` exit, the key's ``__hash__``) and before the ``try`` left the count behind:
    every later read of the key started stale, so read-through never filled it again
    (4 of the first 80 points of a put, 4 of a remove). Reads registered likewise.

    Interrupts are aimed at the hybrid's own code (each call it makes, each C call's
    return in it): the tiers' own interrupt defects are the xfail tests below."""
    url = f"{redis_server.url}?prefix=int7-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}:"
    store = _hybrid(tmp_path, url)
    rng = random.Random(11)
    only = ("hybrid_backend.py",)
    remote = store.remote
    assert remote is not None
    try:
        for i in range(6):  # in the remote only: gets read through and fill
            remote.put(_key(i), _chunk(i))
        ops: dict[str, Callable[[int], Any]] = {
            "put": lambda i: store.put(_key(i), _chunk(100 + i)),
            "put-queued": lambda i: store.put(_key(i), _chunk(100 + i), blocking=False),
            "get": lambda i: store.get(_key(i)),
            "batched_get": lambda i: store.batched_get([_key(i), _key((i + 1) % 6), _key(99)]),
            "remove": lambda i: store.remove(_key(i)),
            "contains": lambda i: store.contains(_key(i)),
        }
        bad: list[str] = []
        for name, op in ops.items():
            for n in _sample(_points(lambda: op(0), only), 60, rng):
                i = rng.randrange(6)
                for _name, tier in store.local_tiers:  # a miss locally: the read-through path
                    tier.remove(_key(i))
                if name == "get" or name == "batched_get":
                    remote.put(_key(i), _chunk(i))
                where = _interrupted(lambda: op(i), n, only)
                left = _marks_left(store)
                if left:
                    bad.append(f"{name} point {n} ({where}): {left[:2]}")
                    for stripe in store._stripes:
                        stripe.writes.clear()
                        stripe.reads.clear()
        assert not bad, bad[:6]
        # Read-through still fills: a remote hit lands in the memory tier.
        remote.put(_key(50), _chunk(50))
        got = _bounded(lambda: store.get(_key(50)))
        assert got is not None and torch.equal(got, _chunk(50))
        assert store.local_tiers[0][1].contains(_key(50))
        # Every answer is what was put last, or a miss.
        for i in range(6):
            got = _bounded(lambda: store.get(_key(i)))
            assert got is None or torch.equal(got, _chunk(i)) or torch.equal(got, _chunk(100 + i))
    finally:
        _bounded(store.close, 30)


def test_an_interrupted_hybrid_close_is_finished_by_the_next_close(tmp_path: Path) -> None:
    """Regression: ``close()`` set its closing flag first and returned at once when called
    again, so a close interrupted before it reached the tiers (or between them) left them
    open for good: a memory tier's writer and the disk tier's threads kept running."""
    only = ("hybrid_backend.py",)
    probe = _hybrid(tmp_path / "probe", None)
    total = _points(probe.close, only)
    assert total > 3
    for n in range(1, total + 1):
        store = _hybrid(tmp_path / str(n), None)
        store.put(_key(n), _chunk(n))
        _interrupted(store.close, n, only)
        _bounded(store.close, 30)
        open_tiers = [name for name, tier in store.local_tiers if not tier._closed]  # type: ignore[attr-defined]
        assert not open_tiers, f"point {n}: {open_tiers} never closed"
        reopened = LMCLocalDiskBackend(
            LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / str(n) / "disk")), None, "cpu"
        )
        try:
            got = reopened.get(_key(n))
            assert got is not None and torch.equal(got, _chunk(n))
        finally:
            reopened.close()


# -- real signals, at random moments ---------------------------------------------------------


# Real SIGINTs land at random points of the main thread, library code with process-wide
# state included (shared buffer pools, fsspec's loop). One full run with them in it had
# later remote tests fail (not seen when those ran alone), so they run on request only
# (`scripts/test.sh -m slow tests/test_interrupts_audit7.py`).
@pytest.mark.slow
def test_real_sigints_at_random_moments_during_reads_never_give_a_wrong_tensor_or_a_hang(
    tmp_path: Path, redis_server: Any, s3_server: Any
) -> None:
    """SIGINT sent to the main thread by a helper after a random delay, while the main thread
    loops over gets, batched gets and contains of a memory + disk + Redis hybrid and of an S3
    remote (plain and pipelined): every answer is a miss or the bytes put; the stores answer
    after each interrupt and close in bounded time."""
    tag = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    stores: dict[str, Any] = {
        "hybrid": _hybrid(tmp_path, f"{redis_server.url}?prefix=sig7-{tag}:"),
        "s3": open_backend(f"{s3_server.url(f'sig7-{tag}')}?endpoint_url={s3_server.endpoint_url}", dst_device="cpu"),
        "s3-pipelined": open_backend(
            f"{s3_server.url(f'sig7p-{tag}')}?endpoint_url={s3_server.endpoint_url}", pipelined=True, dst_device="cpu"
        ),
    }
    rng = random.Random(2026)
    main = threading.get_ident()
    interrupted = 0
    try:
        for store in stores.values():
            for i in range(8):
                store.put(_key(i), _chunk(i))
        for name, store in stores.items():
            deadline = time.monotonic() + 6.0
            for _ in range(200):
                if time.monotonic() > deadline:
                    break
                i = rng.randrange(10)
                delay = rng.uniform(0.0, 0.004)
                timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
                got: list[Any] = []
                try:
                    timer.start()
                    kind = rng.randrange(3)
                    if kind == 0:
                        got = [store.get(_key(i))]
                    elif kind == 1:
                        got = list(store.batched_get([_key(i), _key((i + 3) % 10)]))
                    else:
                        store.contains(_key(i))
                    timer.join()
                    time.sleep(0.002)  # a signal sent just after the call lands here
                except KeyboardInterrupt:
                    interrupted += 1
                    timer.join()
                for g in got:
                    assert g is None or torch.equal(g, _chunk(g.flatten()[0].item())), name
                # The store still answers, and right.
                again = _bounded(lambda: store.get(_key(1)))
                assert again is not None and torch.equal(again, _chunk(1)), name
    finally:
        for store in stores.values():
            _bounded(store.close, 30)
    assert interrupted > 20  # the signals did land inside operations


# -- regressions: defects of the memory and disk tiers -------------------------------------


def test_an_interrupted_queued_put_on_the_memory_tier_leaves_it_working() -> None:
    """put_nonblocking put into a queue.Queue from the caller's thread: an interrupt
    inside Queue.put (its Condition's Python __enter__/__exit__, _put) left the queue's
    mutex held (the writer and every later put and close() hung), or the item queued
    without unfinished_tasks (the writer's task_done raised and the writer died), or the
    key in _pending but never queued. The queue is a SimpleQueue now (one C call)."""
    store = LMCLocalBackend(LMCacheEngineConfig(max_local_cache_size=0.001), None, "cpu")
    total = _points(lambda: store.put(_key(0), _chunk(0), blocking=False))
    bad: list[str] = []
    for n in range(1, total + 1):
        where = _interrupted(lambda: store.put(_key(n), _chunk(n), blocking=False), n)
        try:
            _bounded(lambda: store.put(_key("after"), _chunk(7), blocking=False), 5)
            assert _bounded(lambda: store._worker.is_alive())
            time.sleep(0.01)
            with store._lock:
                stuck = [k for k in store._pending if k != _key("after")]
            assert not stuck, "a key in _pending that no writer will store"
        except BaseException as exc:
            bad.append(f"point {n} ({where}): {exc!r:.80}")
            break
    try:
        _bounded(store.close, 5)
    except BaseException as exc:
        bad.append(f"close: {exc!r:.80}")
    assert not bad, bad


def test_an_interrupted_overwrite_on_the_memory_tier_leaves_its_lru_index_whole() -> None:
    """LRUIndex kept an OrderedDict keyed by CacheEngineKey, whose __eq__/__hash__ are
    Python code: an interrupt landing in __eq__ inside OrderedDict.pop left CPython's C
    OrderedDict's linked list and table out of step, and every later put raised
    KeyError. And the memory tier changed _chunks and the index in two steps."""
    store = LMCLocalBackend(LMCacheEngineConfig(max_local_cache_size=0.0001), None, "cpu")
    try:
        for i in range(4):
            store.put(_key(i), _chunk(i))
        total = _points(lambda: store.put(_key(1), _chunk(1)))
        for n in range(1, total + 1):
            _interrupted(lambda: store.put(_key(1), _chunk(1)), n)
            index = store._index
            with store._lock:
                assert index.items(), "index emptied"
                assert len(index.items()) == len(index)
                assert index.used == sum(size for _, size in index.items()), f"point {n}: used bytes off"
                assert set(index) == set(store._chunks), f"point {n}: index and chunks differ"
            for i in range(12):  # puts evicting through the index keep working
                store.put(_key(100 + i), _chunk(i))
    finally:
        store.close()


def _memory_in_step(store: LMCLocalBackend, where: str) -> None:
    index = store._index
    with store._lock:
        assert index.used == sum(size for _, size in index.items()), f"{where}: used bytes off"
        assert index.used <= index.budget, f"{where}: over budget"
        assert set(index) == set(store._chunks), f"{where}: index and chunks differ"
        sizes = {k: c.numel() * c.element_size() for k, c in store._chunks.items()}
        assert dict(index.items()) == sizes, f"{where}: index sizes and stored bytes differ"


def _evicting_put_or_remove(store: Any, op: str, keys: int, rng: random.Random) -> Callable[[], None]:
    """Fill ``store`` with ``keys`` chunks; a step that puts a new key (evicting one) or
    removes one of them."""
    for i in range(keys):
        store.put(_key(i), _chunk(i))
    fresh = iter(range(1000, 10**6))

    def step() -> None:
        if op == "remove":
            store.remove(_key(rng.randrange(keys)))
        else:
            store.put(_key(next(fresh)), _chunk(3))

    return step


@pytest.mark.parametrize("op", ["evicting put", "remove"])
def test_an_interrupted_eviction_or_removal_on_the_memory_tier_keeps_index_and_chunks_in_step(op: str) -> None:
    store = LMCLocalBackend(LMCacheEngineConfig(max_local_cache_size=0.0001), None, "cpu")
    try:
        step = _evicting_put_or_remove(store, op, 12, random.Random(11))
        total = _points(step)
        for n in range(1, total + 1):
            _interrupted(step, n)
            _memory_in_step(store, f"point {n}")
            for i in range(12):  # puts evicting through the index keep working
                store.put(_key(i), _chunk(i))
            _memory_in_step(store, f"after point {n}")
    finally:
        store.close()


@pytest.mark.parametrize("op", ["evicting put", "remove"])
def test_an_interrupted_eviction_or_removal_on_the_disk_tier_leaves_no_mark_or_count(tmp_path: Path, op: str) -> None:
    """Drop marks (``_dropping``) and in-flight counts were left behind when an interrupt
    ended an eviction's loop part way or landed between a put's count and its try."""
    root = tmp_path / "d"
    size = LMCLocalDiskBackend(LMCacheEngineConfig(local_device=None, local_disk=str(root)), None, "cpu")
    one = size._file_size_checked(_key(0), _chunk(0))
    size.close()
    cfg = LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "e"), max_local_disk_size=6 * one / 1e9)
    store = LMCLocalDiskBackend(cfg, None, "cpu")
    rng = random.Random(12)
    try:
        step = _evicting_put_or_remove(store, op, 6, rng)
        total = _points(step, ("local_backend.py", "evictor.py"))
        for n in _sample(total, 120, rng):
            where = _interrupted(step, n, ("local_backend.py", "evictor.py"))
            with store._lock:
                assert not store._dropping, f"point {n} ({where}): a drop mark never taken back"
                assert not store._inflight, f"point {n} ({where}): a put counted in flight for good"
                index = store._index
                assert index.used == sum(s for _, s in index.items()), f"point {n}: used bytes off"
                assert index.used <= index.budget
                # Every chunk file is counted, at its size (none left out of the index).
                files = {key: st.st_size for _, st, key in scan_store(store.root) if key is not None}
                assert dict(index.items()) == files, f"point {n} ({where}): index and files differ"
            store.put(_key(2), _chunk(2))  # a key of the tier's is put, evicted and read again
            got = store.get(_key(2))
            assert got is not None and torch.equal(got, _chunk(2)), f"point {n} ({where})"
    finally:
        _bounded(store.close, 10)


def test_an_interrupted_queued_put_on_the_disk_tier_leaves_gets_answering(tmp_path: Path) -> None:
    """put_nonblocking of the disk tier added queued bytes, counted the put in flight and
    registered its future before queue.Queue.put: an interrupt between left a future
    that never completed (a get of the key waited on it for good), queued bytes that
    never drained and an _inflight count never taken back."""
    store = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "d"), max_local_disk_size=0.01), None, "cpu"
    )
    try:
        total = _points(lambda: store.put(_key(0), _chunk(0), blocking=False))
        for n in range(1, total + 1):
            _interrupted(lambda: store.put(_key(n), _chunk(n), blocking=False), n)
            got = _bounded(lambda: store.get(_key(n)), 5)
            assert got is None or torch.equal(got, _chunk(n))
            assert _soon(lambda: store._queued.queued == 0 and not store._inflight), f"point {n}: writes never drain"
            with store._lock:
                assert store._queued.queued == 0, f"point {n}: {store._queued.queued} bytes stay queued"
                assert not store._inflight, f"point {n}: a put stays in flight"
                assert not store._dropping, f"point {n}: a drop mark never taken back"
    finally:
        _bounded(store.close, 10)


def test_an_interrupt_as_the_disk_tier_opens_a_chunk_is_not_swallowed(tmp_path: Path) -> None:
    store = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "d")), None, "cpu"
    )
    try:
        store.put(_key(1), _chunk(1))
        only = ("disk_io.py",)
        total = _points(lambda: store.get(_key(1)), only)
        lost = []
        for n in range(1, total + 1):
            probe = _Interrupt(n, only)
            sys.setprofile(probe)
            try:
                got = store.get(_key(1))
            except KeyboardInterrupt:
                continue
            finally:
                sys.setprofile(None)
            if probe.where:  # it was raised, and the get returned anyway
                lost.append(f"point {n} ({probe.where}): returned {'a miss' if got is None else 'a hit'}")
        assert not lost, lost
    finally:
        store.close()


# Real SIGINTs land at random points of the main thread, library code with process-wide
# state included (shared buffer pools, fsspec's loop). One full run with them in it had
# later remote tests fail (not seen when those ran alone), so they run on request only
# (`scripts/test.sh -m slow tests/test_interrupts_audit7.py`).
@pytest.mark.slow
def test_a_blocking_remote_put_interrupted_while_sending_never_stores_a_mix(redis_server: Any, tmp_path: Path) -> None:
    tag = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    store = open_backend(f"{redis_server.url}?prefix=mix7-{tag}:", dst_device="cpu")
    mixed = []
    main = threading.get_ident()
    try:
        for it in range(60):
            tensor = torch.zeros(8 << 20)  # 32 MiB: sent by an I/O thread while the caller waits
            key = _key(f"mix{it}")
            delay = 0.001 + 0.0005 * (it % 30)  # from the start of the send to its end
            timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
            try:
                timer.start()
                store.put(key, tensor)
                timer.join()
                time.sleep(0.01)  # a signal sent just after the put lands here
            except KeyboardInterrupt:
                tensor.fill_(1.0)  # the caller's buffer is its own again: it reuses it
            timer.join()
            time.sleep(0.3)
            got = _bounded(lambda: store.get(key))
            if got is not None and got.unique().numel() > 1:
                mixed.append(it)
                break
        assert not mixed, f"a get returned a mix of two puts' bytes (iteration {mixed})"
    finally:
        _bounded(store.close, 30)


def test_a_close_after_an_interrupted_close_of_the_disk_tier_drains_the_queue(tmp_path: Path) -> None:
    """close() of the disk tier set _closed before it joined its writers: after an
    interrupt in the join, every later close() (the exit drain's too) returned at once
    while acknowledged queued writes were still being written."""
    from lmcache_core.storage_backend import disk_io

    cfg = LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "d"))
    store = LMCLocalDiskBackend(cfg, None, "cpu", put_workers=1)
    gate = threading.Event()

    def slow_disk(op: str, path: str) -> None:  # the writer's disk is slow: opens wait for the gate
        if op == "open" and threading.current_thread().name.startswith("lmcache-disk-put"):
            gate.wait(HANG_S)

    previous = disk_io.set_fault_hook(slow_disk)
    try:
        for i in range(4):
            store.put(_key(i), _chunk(i), blocking=False)
        threading.Timer(0.2, gate.set).start()

        def interrupt_the_join(frame: FrameType, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_name == "join":
                raise KeyboardInterrupt

        sys.setprofile(interrupt_the_join)
        try:
            store.close()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        _bounded(store.close)
        assert all(not w.is_alive() for w in store._workers), "close() returned with writes still queued"
    finally:
        gate.set()
        disk_io.set_fault_hook(previous)
        for w in store._workers:
            w.join(HANG_S)
    reopened = LMCLocalDiskBackend(cfg, None, "cpu")
    try:
        assert all(reopened.contains(_key(i)) for i in range(4))
    finally:
        reopened.close()


def test_no_temp_files_are_left_after_interrupted_disk_puts_and_a_close(tmp_path: Path) -> None:
    """A blocking put interrupted anywhere (its temp file open, half written, being renamed)
    leaves no temp file, and the index rebuilt at reopen matches the files: each key reads
    back the bytes of one of its puts, or is a miss."""
    root = tmp_path / "d"
    cfg = LMCacheEngineConfig(local_device=None, local_disk=str(root), max_local_disk_size=0.01)
    store = LMCLocalDiskBackend(cfg, None, "cpu")
    rng = random.Random(5)
    put_values: dict[int, set[int]] = {}
    try:
        total = _points(lambda: store.put(_key(0), _chunk(0)), ("local_backend.py", "disk_io.py", "chunk_format.py"))
        for n in _sample(total, 150, rng):
            i, v = rng.randrange(8), rng.randrange(1000)
            put_values.setdefault(i, set()).add(v)
            _interrupted(lambda: store.put(_key(i), _chunk(v)), n, ("local_backend.py", "disk_io.py", "chunk_format.py"))
    finally:
        _bounded(store.close, 30)
    leftovers = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    assert not leftovers, leftovers[:3]
    reopened = LMCLocalDiskBackend(cfg, None, "cpu")
    try:
        files = {p for p in root.rglob("*.safetensors")}
        assert len(reopened.list()) == len(files)
        for i, values in put_values.items():
            got = reopened.get(_key(i))
            assert got is None or int(got.flatten()[0].item()) in values and torch.equal(
                got, _chunk(got.flatten()[0].item())
            )
        assert reopened.used_bytes == sum(os.path.getsize(p) for p in files)
    finally:
        reopened.close()


def test_the_exit_drain_gives_up_on_a_store_whose_close_never_ends() -> None:
    """A store left broken (a lock an interrupted thread never let go) hung the
    interpreter's exit for good: the exit drain now gives up after its limit."""
    import subprocess

    code = (
        "import threading\n"
        "from lmcache_core.storage_backend import write_queue\n"
        "write_queue.EXIT_DRAIN_LIMIT_S = 1.0\n"
        "class Stuck:\n"
        "    def close(self): threading.Event().wait()\n"
        "    def describe(self): return 'stuck'\n"
        "stuck = Stuck()\n"
        "write_queue.drain_at_exit(stuck)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "given up on them" in proc.stderr, proc.stderr
