"""Interrupt safety of the remote tier: a KeyboardInterrupt landing anywhere in an operation.

Serving processes turn Ctrl-C and SIGTERM into a KeyboardInterrupt raised in the main
thread wherever it is. As in ``test_interrupts_audit7``, a profile function raises it
at the n-th 'call' or 'c_return' point of an operation on the main thread, and each
test walks n over every point (or a seeded sample), against real servers (Redis, moto
S3, a local directory through fsspec), for ``LMCRemoteBackend`` and
``LMCPipelinedRemoteBackend``. The interrupt escaping is expected. Not expected, and
checked after each one: another exception in its place or none at all (swallowed into
a miss), a lock left held, a thread of the store (I/O, writer, fetch, decode) stuck
anywhere but its idle wait, queued bytes or queued keys never taken back, a Redis
connection leaked or handed on with a reply unread, a close() that hangs or returns
before acknowledged writes are stored, and a get that serves bytes no put of its key
wrote (or an older chunk than a failed or interrupted put's).
"""

# Lambdas here are called at once, inside the iteration that made them (B023 is for
# closures called later).
# ruff: noqa: B023

from __future__ import annotations

import hashlib
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from lmcache_core.errors import StoreUnavailableError
from lmcache_core.storage_backend import open_backend, write_queue
from lmcache_core.storage_backend.remote_backend import (
    LMCPipelinedRemoteBackend,
    LMCRemoteBackend,
    RetryPolicy,
)
from tests.test_interrupts_audit7 import HANG_S, _bounded, _chunk, _free, _Interrupt, _key, _points, _sample

# The harness may raise its interrupt in a generator being closed, where Python ignores it.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SETTLE_S = 10.0  # how long a store's threads may take to finish what an interrupt left running


@pytest.fixture(autouse=True)
def _no_exit_drain_of_stores_left_open() -> Iterator[None]:
    """A store a failed test left open must not hold up the interpreter's exit drain."""
    before = set(write_queue._open_writers)
    yield
    for backend in set(write_queue._open_writers) - before:
        write_queue.forget_at_exit(backend)


def _tag(tmp_path: Path) -> str:
    return hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest, **options: Any) -> LMCRemoteBackend:
    """A remote store of ``kind`` (``redis``, ``s3``, ``dir``; ``-pipelined`` for the pipelined backend)."""
    base, _, variant = kind.partition("-")
    tag = _tag(tmp_path)
    if base == "redis":
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?prefix=intr-{tag}:"
    elif base == "s3":
        server = request.getfixturevalue("s3_server")
        url = f"{server.url(f'intr-{tag}')}?endpoint_url={server.endpoint_url}"
    else:
        url = f"fsspec+file://{tmp_path / 'remote'}"
    store = open_backend(url, pipelined=variant == "pipelined", dst_device="cpu", **options)
    assert isinstance(store, LMCRemoteBackend)
    return store


def _interrupt_at(fn: Callable[[], Any], n: int, only: tuple[str, ...] = ()) -> tuple[str | None, str]:
    """Run ``fn`` with a KeyboardInterrupt at point ``n``: (where it landed or None if it ran
    out, '' or what went wrong: another exception in its place, or the interrupt swallowed)."""
    probe = _Interrupt(n, only)
    sys.setprofile(probe)
    try:
        fn()
    except KeyboardInterrupt:
        return probe.where or "?", ""
    except BaseException as exc:  # the defect: the interrupt replaced
        return probe.where or "?", f"{type(exc).__name__} instead of the interrupt: {exc!s:.100}"
    finally:
        sys.setprofile(None)
    if probe.where:
        return probe.where, "the interrupt was swallowed"
    return None, ""


# What each of a store's own threads runs when it has nothing to do.
_IDLE = {
    "lmcache-remote-io": "_run",
    "lmcache-remote-put": "put_worker",
    "lmcache-remote-fetch": "network_worker",
    "lmcache-remote-decode": "deserialize_worker",
}


def _busy_threads(store: LMCRemoteBackend) -> list[str]:
    """The store's threads not idle in their loop's wait: '' when all are (a thread left
    stuck on a lock an interrupt left held stays on the list)."""
    threads = list(store._put_threads) + list(getattr(store, "_stage_threads", []))
    frames = sys._current_frames()
    busy = []
    for t in threads:
        frame = frames.get(t.ident or -1)
        want = next(v for k, v in _IDLE.items() if t.name.startswith(k))
        if frame is not None and frame.f_code.co_name == "wait" and frame.f_back is not None:
            if frame.f_back.f_code.co_name == "get" and frame.f_back.f_code.co_filename.endswith("queue.py"):
                frame = frame.f_back.f_back  # idle in a queue.Queue's get
        if frame is not None and frame.f_code.co_name != want:
            busy.append(f"{t.name} in {frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})")
    return busy


def _io_threads_free(store: LMCRemoteBackend) -> bool:
    """Whether every I/O thread takes work: all of them must meet at a barrier."""
    count = len(store._io._threads)
    barrier = threading.Barrier(count + 1)
    futures = [store._io.submit(barrier.wait, 5.0) for _ in range(count)]
    try:
        barrier.wait(5.0)
    except threading.BrokenBarrierError:
        return False
    return all(f.result(5.0) is not None for f in futures)


def _settled(store: LMCRemoteBackend) -> list[str]:
    """What an interrupted operation left behind, once the store's threads had time to finish."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        with store._lock:
            queued, pending, writing = store._queued.queued, len(store._pending), len(store._writing)
        busy = _busy_threads(store)
        if not (queued or pending or writing or busy) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    left = []
    if queued or pending or writing:
        left.append(f"{queued} bytes queued, {pending} keys pending, {writing} writing")
    left += busy
    if not _free(store._lock):
        left.append("store lock held")
    if not _free(store.breaker._lock):
        left.append("breaker lock held")
    if not _io_threads_free(store):
        left.append("an I/O thread is stuck")
    return left


def _value(t: torch.Tensor | None) -> int | None:
    """The value a ``_chunk`` was made of (None for a miss); a tensor of mixed bytes fails."""
    if t is None:
        return None
    v = int(t.flatten()[0].item())
    assert torch.equal(t, _chunk(v, tuple(t.shape))), "a tensor no put wrote (mixed bytes)"
    return v


STORES = ["redis", "redis-pipelined", "s3", "s3-pipelined", "dir-pipelined"]


@pytest.mark.parametrize("kind", STORES)
def test_interrupts_anywhere_in_remote_operations_leave_the_store_whole(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: every remote call waited on a ``concurrent.futures.Future``; an interrupt
    in its ``result()`` left the future's condition lock held (the I/O thread finishing
    the call hung in ``set_result`` for good: a thread of the pool lost per interrupt)
    or released it twice (a ``RuntimeError`` replaced the interrupt, and a get read it
    as an outage: a miss, the Ctrl-C swallowed). A queued put used ``queue.Queue.put``
    (its mutex left held: the writer and close() hung) after counting its bytes and
    registering its key (never taken back). A pipelined batch's ``Condition`` hung
    the fetch threads the same way."""
    store = _open(kind, tmp_path, request)
    rng = random.Random(f"remote-{kind}")
    values: dict[int, set[int | None]] = {i: {None} for i in range(6)}
    counter = iter(range(1000, 1_000_000))

    def put(i: int, blocking: bool = True) -> None:
        v = next(counter)
        values[i].add(v)
        store.put(_key(i), _chunk(v), blocking=blocking)

    ops: dict[str, Callable[[int], Any]] = {
        "put": lambda i: put(i),
        "put-queued": lambda i: put(i, blocking=False),
        "get": lambda i: _value(store.get(_key(i))),
        "batched_get": lambda i: [_value(t) for t in store.batched_get([_key(i), _key((i + 1) % 6), _key(99)])],
        "contains": lambda i: store.contains(_key(i)),
        "remove": lambda i: store.remove(_key(i)),
    }
    bad: list[str] = []
    try:
        for i in range(6):
            put(i)
        for name, op in ops.items():
            total = _points(lambda: op(0))
            for n in _sample(total, 14 if kind.startswith("s3") else 22, rng):
                i = rng.randrange(6)
                where, wrong = _interrupt_at(lambda: op(i), n)
                left = _settled(store)
                if wrong or left:
                    bad.append(f"{name} point {n}/{total} ({where}): {wrong} {left[:3]}")
                    if left:
                        break  # the store is broken: later points would only repeat it
        assert not bad, bad[:6]
        # Every key reads back the bytes of one of its puts, or is a miss.
        for i in range(6):
            got = _value(_bounded(lambda: store.get(_key(i))))
            assert got in values[i], f"key {i}: {got} was never put"
        # And the store still works.
        put(0)
        assert _value(_bounded(lambda: store.get(_key(0)))) == max(v for v in values[0] if v is not None)
    finally:
        _bounded(store.close, 30)


@pytest.mark.parametrize("kind", ["redis", "s3", "dir-pipelined"])
def test_an_interrupted_close_is_finished_by_the_next_close(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: close() marked itself done in a ``finally``, so one interrupted while it
    drained the queue (or before it started the drain) had every later close(), the
    exit drain's too, return at once with acknowledged writes still queued, or wait
    out twice its close timeout and return with them unwritten."""
    probe = _open(kind, tmp_path / "probe", request)
    probe.put(_key(0), _chunk(0), blocking=False)
    total = _points(probe.close)
    assert total >= 3
    rng = random.Random(f"close-{kind}")
    for n in _sample(total + 3, 10, rng):
        store = _open(kind, tmp_path / f"c{n}", request)
        gate = threading.Event()
        real = store.connector.put_chunk

        def slow_put(*args: Any) -> None:  # a slow remote: queued writes are still queued at close()
            gate.wait(HANG_S)
            real(*args)

        store.connector.put_chunk = slow_put  # type: ignore[method-assign]
        store.connector.puts_inline = lambda size: False  # type: ignore[method-assign]
        try:
            for i in range(4):
                store.put(_key(i), _chunk(100 + i), blocking=False)
            threading.Timer(0.05, gate.set).start()
            where, wrong = _interrupt_at(store.close, n)
            assert not wrong, f"point {n} ({where}): {wrong}"
            _bounded(store.close, 30)
            assert store._close_done.is_set()
            assert not store._pending, f"point {n} ({where}): close() returned with writes queued"
        finally:
            gate.set()
            _bounded(store.close, 30)
        reopened = _open(kind, tmp_path / f"c{n}", request)
        try:
            got = [_value(reopened.get(_key(i))) for i in range(4)]
            assert got == [100, 101, 102, 103], f"point {n} ({where}): {got}"
        finally:
            reopened.close()
    probe.close()


@pytest.mark.parametrize("kind", ["redis", "s3"])
def test_a_key_whose_put_failed_or_was_interrupted_never_reads_as_its_older_chunk(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: the mark that makes a key whose latest put failed read as a miss (the
    remote may hold an older chunk; a hybrid's local tiers had the newer one) was set
    only after the failure, in its bookkeeping: an interrupt there, or anywhere in a
    put (an inline Redis put's ``except Exception`` let it through unmarked) or in a
    remove, and the older chunk was served."""
    store = _open(kind, tmp_path, request, retry=RetryPolicy(attempts=1))
    key = _key("stale")
    connector = store.connector
    connector.put_chunk_calls = 0  # type: ignore[attr-defined]

    def failing(*args: Any) -> None:
        connector.put_chunk_calls += 1  # type: ignore[attr-defined]
        raise ConnectionError("the remote dropped the put")

    def remote_fails(fails: bool) -> None:
        if fails:
            connector.put_chunk = failing  # type: ignore[method-assign]
            connector.puts_inline = lambda size: False  # type: ignore[method-assign]
        else:
            vars(connector).pop("put_chunk", None)
            vars(connector).pop("puts_inline", None)
        store.breaker.reset()

    rng = random.Random(f"stale-{kind}")
    bad: list[str] = []
    try:
        store.put(key, _chunk(1))  # the older chunk, on the remote
        # An interrupted put after a failed one: the new chunk or a miss, never the older one.
        total = _points(lambda: store.put(key, _chunk(2)))
        for n in _sample(total, 30, rng):
            store.put(key, _chunk(1))
            remote_fails(True)
            with pytest.raises(StoreUnavailableError):
                store.put(key, _chunk(3))
            remote_fails(False)
            v = 1000 + n
            where, wrong = _interrupt_at(lambda: store.put(key, _chunk(v)), n)
            got = _value(_bounded(lambda: store.get(key)))
            if wrong or got not in (None, v):
                bad.append(f"put point {n} ({where}): {wrong} read {got}, put {v}")
        # A put that fails, interrupted anywhere once the remote was asked (its failure's
        # bookkeeping too): a miss.
        remote_fails(True)
        total = _points(lambda: pytest.raises(StoreUnavailableError, store.put, key, _chunk(4)))
        for n in _sample(total, 30, rng):
            remote_fails(False)
            store.put(key, _chunk(1))
            remote_fails(True)
            asked = connector.put_chunk_calls = 0  # type: ignore[attr-defined]
            probe = _Interrupt(n)
            sys.setprofile(probe)
            try:
                store.put(key, _chunk(4))
            except BaseException:  # the put's own failure, or the interrupt
                pass
            finally:
                sys.setprofile(None)
            asked = connector.put_chunk_calls  # type: ignore[attr-defined]
            remote_fails(False)
            got = _value(_bounded(lambda: store.get(key)))
            if asked and got is not None:
                bad.append(f"failed put point {n} ({probe.where}): read {got}")
        # An interrupted remove: the interrupt comes out, and the store answers.
        remote_fails(False)
        total = _points(lambda: store.remove(key))
        for n in _sample(total, 20, rng):
            store.put(key, _chunk(1))
            where, wrong = _interrupt_at(lambda: store.remove(key), n)
            got = _value(_bounded(lambda: store.get(key)))
            if wrong or got not in (None, 1):
                bad.append(f"remove point {n} ({where}): {wrong} read {got}")
        assert not bad, bad[:6]
    finally:
        remote_fails(False)
        _bounded(store.close, 30)


def test_interrupted_inline_redis_gets_and_puts_leave_every_connection_in_the_pool(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: a connection taken for an inline get or put (on the caller's thread) and
    interrupted while checked for a stale reply, or while given back, stayed counted in
    use for good (its socket open: one connection lost per interrupt, and with
    ``max_connections`` the pool ran dry). Given back, a connection never carries a
    reply its next user would read as its own."""
    store = _open("redis", tmp_path, request)
    only = ("redis_connector.py",)
    big = (2, 2, 64, 64, 8)  # 512 KiB: large enough for inline gets
    try:
        for i in range(4):
            store.put(_key(i), _chunk(i, big))
        assert _value(store.get(_key(0))) == 0
        assert store.connector.gets_inline() and store.connector.puts_inline(1 << 19)
        pool = store.connector._client().connection_pool
        rng = random.Random(3)
        bad: list[str] = []
        ops: dict[str, Callable[[int], Any]] = {
            "get": lambda i: store.get(_key(i)),
            "put": lambda i: store.put(_key(i), _chunk(i, big)),
        }
        for name, op in ops.items():
            total = _points(lambda: op(0), only)
            for n in _sample(total, 60, rng):
                i = rng.randrange(4)
                where, wrong = _interrupt_at(lambda: op(i), n, only)
                with pool._lock:
                    in_use = len(pool._in_use_connections)
                if wrong or in_use:
                    bad.append(f"{name} point {n}/{total} ({where}): {wrong} {in_use} connections left in use")
                    with pool._lock:
                        pool._in_use_connections.clear()
                # Whatever the interrupt left, each key reads back its own chunk (the key
                # of an interrupted put may read as a miss until it is put again).
                for j in range(4):
                    got = _value(store.get(_key(j)))
                    if got != j and not (got is None and name == "put" and j == i):
                        bad.append(f"{name} point {n} ({where}): key {j} read {got}")
                store.put(_key(i), _chunk(i, big))
        assert not bad, bad[:6]
        assert store.stats["corrupt"] == 0
    finally:
        _bounded(store.close, 30)


def test_a_connection_given_back_with_an_interrupt_in_its_close_never_reaches_the_pool(
    redis_server: Any,
) -> None:
    """A connection whose reply was never read (a timeout, then an interrupt in the
    clean-up) stays out of the pool: the next user would read that reply as its own."""
    from lmcache_core.storage_backend.connector import redis_connector

    conn_store = open_backend(f"{redis_server.url}?prefix=intr-giveback:", dst_device="cpu")
    try:
        conn_store.put(_key(0), _chunk(0))
        pool = conn_store.connector._client().connection_pool
        total = 0
        for n in range(1, 200):
            conn_store.connector._client().ping()  # an open connection in the pool
            conn = redis_connector._take_open_connection(pool, conn_store.connector._redis)
            assert conn is not None
            conn.send_command("PING")  # its reply is left unread
            probe = _Interrupt(n)
            sys.setprofile(probe)
            try:
                redis_connector._give_back(pool, conn, False)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            if not probe.where:
                total = n
                break
            with pool._lock:
                handed_on = conn in pool._available_connections
                pool._in_use_connections.discard(conn)
            if handed_on:
                assert conn._sock is None, f"point {n} ({probe.where}): back in the pool with a reply unread"
        assert total > 1
    finally:
        _bounded(conn_store.close, 30)


def test_an_interrupted_pipelined_batch_leaves_no_fetch_or_decode_thread_behind(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Regression: the first batched_get started the stage threads on the caller's thread;
    ``Thread.start`` waits for the new thread through an Event, and an interrupt in
    that wait could leave its lock held (the thread never ran), or between two starts
    left the stages half started and unrecorded (close() never ended them)."""
    rng = random.Random(9)
    probe = _open("redis-pipelined", tmp_path / "probe", request)
    probe.put(_key(0), _chunk(0))
    total = _points(lambda: probe.batched_get([_key(0)]))
    probe.close()
    for n in _sample(total, 12, rng):
        store = _open("redis-pipelined", tmp_path / f"p{n}", request)
        assert isinstance(store, LMCPipelinedRemoteBackend)
        try:
            store.put(_key(0), _chunk(0))
            where, wrong = _interrupt_at(lambda: store.batched_get([_key(0)]), n)
            assert not wrong, f"point {n} ({where}): {wrong}"
            got = _bounded(lambda: store.batched_get([_key(0), _key(1)]))
            assert [_value(t) for t in got] == [0, None]
            assert not _settled(store), f"point {n} ({where}): {_settled(store)}"
            assert len(store._stage_threads) == store.fetch_workers + store.decode_workers
        finally:
            _bounded(store.close, 30)
        assert all(not t.is_alive() for t in store._stage_threads), f"point {n}: a stage thread outlived close()"


def test_a_hybrid_put_interrupted_as_it_waits_for_the_remote_never_stores_the_reused_buffer(
    tmp_path: Path, redis_server: Any
) -> None:
    """The hybrid called the remote wait (start_put's) inside ``except Exception`` only:
    an interrupt landing as it was called left the send running, the caller reused its
    buffer, and the remote stored those bytes with a valid checksum (a wrong tensor for
    every other process). It abandons the send on anything raised now."""
    from tests.test_interrupts_audit7 import _hybrid

    store = _hybrid(tmp_path, f"{redis_server.url}?prefix=intr-hyb-{_tag(tmp_path)}:")
    remote = store.remote
    assert remote is not None
    gate = threading.Event()
    real = remote.connector.put_chunk

    def slow_put(*args: Any) -> None:  # the remote is slow: the chunk is hashed after the gate
        gate.wait(HANG_S)
        real(*args)

    remote.connector.put_chunk = slow_put  # type: ignore[method-assign]
    remote.connector.puts_inline = lambda size: False  # type: ignore[method-assign]

    def interrupt_the_wait(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "finish":
            raise KeyboardInterrupt

    buffer = _chunk(5)
    try:
        sys.setprofile(interrupt_the_wait)
        try:
            store.put(_key("hyb"), buffer)
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        buffer.fill_(9.0)  # the caller's buffer is its own again: it reuses it
        gate.set()
        assert not _settled(remote)
        # Read by another process's store (this one's mark of the failed put is its own).
        other = open_backend(f"{redis_server.url}?prefix=intr-hyb-{_tag(tmp_path)}:", dst_device="cpu")
        try:
            got = _value(_bounded(lambda: other.get(_key("hyb"))))
        finally:
            other.close()
        assert got in (None, 5), f"the remote stored the reused buffer ({got})"
    finally:
        gate.set()
        _bounded(store.close, 30)


@pytest.mark.parametrize("delete_fails", [False, True], ids=["deleted", "delete-failed"])
def test_a_remove_racing_a_queued_write_of_its_key_never_leaves_it_known_or_served(
    tmp_path: Path, redis_server: Any, delete_fails: bool
) -> None:
    """A queued write of the key that finished between remove's stale mark and its wait
    for that write cleared the mark and made the key known again: after the delete,
    contains() said True; after a failed delete, get() served the chunk the caller
    removed. The mark is set again under the lock the wait starts with."""
    store = open_backend(f"{redis_server.url}?prefix=rm-race-{_tag(tmp_path)}:", dst_device="cpu")
    try:
        real_put = store.connector.put_chunk

        def slow_put(*args: Any) -> Any:
            time.sleep(0.1)
            return real_put(*args)

        store.connector.put_chunk = slow_put  # type: ignore[method-assign]
        store.connector.puts_inline = lambda size: False  # type: ignore[method-assign]
        supersede = store._supersede

        def late_supersede(key: Any) -> bool:  # the remover's thread is descheduled a while
            time.sleep(0.3)
            return supersede(key)

        store._supersede = late_supersede  # type: ignore[method-assign]
        store.put(_key("x"), _chunk(1), blocking=False)
        time.sleep(0.02)
        if delete_fails:

            def down(*args: Any) -> Any:
                raise ConnectionError("down")

            store.connector.delete = down  # type: ignore[method-assign]
            with pytest.raises(StoreUnavailableError):
                store.remove(_key("x"))
            store.breaker.reset()
        else:
            assert store.remove(_key("x"))
            assert not store.connector.exists(_key("x"))
        assert not store.contains(_key("x"))
        assert store.get(_key("x")) is None
    finally:
        _bounded(store.close, 30)
