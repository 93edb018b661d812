"""The remote tier over a real redis-server that dies, comes back, hangs or fills up.

Every check is "returns within its bound", never a timed performance assertion.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreFullError, StoreUnavailableError
from lmcache_core.storage_backend.circuit import CircuitBreaker
from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
from tests.conftest import make_key
from tests.servers_redis import free_port
from tests.tcp_proxy import TcpProxy

T = 0.5  # remote_timeout for these tests: short, so dead-server paths stay fast
BOUND = 3 * T  # what any single call may take, retries and all
RECOVER = 10.0  # generous wait for "works again by itself" (breaker cooldown + reconnect)


def chunk(seed: int = 0, shape: tuple[int, ...] = (2, 2, 16, 2, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.float16)


def same(got: torch.Tensor | None, expected: torch.Tensor) -> bool:
    return got is not None and torch.equal(got, expected)


def backend_for(url: str, pipelined: bool = False, **kwargs) -> LMCRemoteBackend:
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    cfg = LMCacheEngineConfig(remote_url=url, remote_timeout=T)
    # A short cooldown so "recovers by itself" takes a second, not the default five.
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.5, name="test")
    return cls(cfg, None, "cpu", breaker=breaker, list_timeout=2 * T, **kwargs)


def timed(fn):
    start = time.monotonic()
    try:
        return fn(), None, time.monotonic() - start
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return None, exc, time.monotonic() - start


def wait_until(pred, timeout: float = RECOVER) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:  # noqa: BLE001 - still recovering
            pass
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_kill_mid_workload_then_restart_recovers(redis_server_private, pipelined):
    server = redis_server_private
    store = backend_for(server.url + "?prefix=kill:", pipelined=pipelined)
    try:
        _kill_mid_workload_then_restart(server, store)
    finally:
        store.close()


def _kill_mid_workload_then_restart(server, store) -> None:
    stored = [(make_key(f"k{i}"), chunk(i)) for i in range(4)]
    # Setup, not what is tested: a fresh backend's first call also connects, which on a
    # loaded 2-core machine can miss the short timeout once.
    assert wait_until(lambda: store.batched_put(stored) == len(stored), timeout=10 * BOUND)

    results: list[tuple[str, object, BaseException | None, float]] = []
    stop = threading.Event()

    def workload() -> None:
        i = 0
        while not stop.is_set():
            key, value = stored[i % len(stored)]
            results.append(("get", *timed(lambda k=key: store.get(k))))
            results.append(("put", *timed(lambda k=key, v=value: store.put(k, v))))
            results.append(("batched_get", *timed(lambda: store.batched_get([k for k, _ in stored]))))
            i += 1

    worker = threading.Thread(target=workload)
    worker.start()
    time.sleep(0.3)
    server.kill()
    killed_at = len(results)
    time.sleep(1.5)
    stop.set()
    worker.join(10)
    assert not worker.is_alive()
    after = results[killed_at + 3 :]  # ops already in flight at the kill may have finished fine
    assert after, "the workload made no calls after the kill"
    for op, _value, exc, elapsed in results:
        assert elapsed < BOUND, (op, elapsed)
        if op == "put":
            assert exc is None or isinstance(exc, StoreUnavailableError), repr(exc)
        else:
            assert exc is None, repr(exc)  # reads never raise: a dead remote is a miss
    for op, value, exc, _ in after:
        if op == "get":
            assert value is None
        elif op == "batched_get":
            assert value == [None] * len(stored)
        else:
            assert isinstance(exc, StoreUnavailableError)

    # Non-blocking puts while it is down: acknowledged at once, then counted as failures.
    before = store.stats["background_put_failures"]
    for i in range(3):
        _, exc, elapsed = timed(lambda i=i: store.put(make_key(f"nb{i}"), chunk(i), blocking=False))
        assert exc is None and elapsed < BOUND
    assert wait_until(lambda: store.stats["background_put_failures"] - before == 3, timeout=10 * BOUND)

    server.restart()  # same port, empty
    def put_back() -> bool:
        store.put(make_key("back"), chunk(9))
        return True

    assert wait_until(put_back)
    got = store.get(make_key("back"))
    assert got is not None and torch.equal(got, chunk(9))
    assert store.batched_get([make_key("back"), make_key("k0")])[0] is not None
    start = time.monotonic()
    store.close()
    assert time.monotonic() - start < BOUND


def test_blackholing_proxy_every_call_returns_within_bound(redis_server):
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        store = backend_for(f"redis://127.0.0.1:{proxy.port}/0?prefix=bh{proxy.port}:", pipelined=True)
        key, value = make_key("bh"), chunk(1)
        store.put(key, value)
        assert same(store.get(key), value)
        proxy.set_mode("blackhole")
        calls = {
            "get": lambda: store.get(key),
            "contains": lambda: store.contains(make_key("unknown")),
            "batched_get": lambda: store.batched_get([key, make_key("other")]),
            "put": lambda: store.put(make_key("bh2"), chunk(2)),
            "list": lambda: store.list(),
            "read_header": lambda: store.read_header(key),
        }
        for name, call in calls.items():
            value_, exc, elapsed = timed(call)
            assert elapsed < BOUND if name != "list" else elapsed < 2 * T + BOUND, (name, elapsed)
            if name in ("put", "list"):
                assert isinstance(exc, StoreUnavailableError), (name, exc)
            else:
                assert exc is None, (name, exc)
        assert timed(lambda: store.put(make_key("nb"), chunk(3), blocking=False))[2] < BOUND
        proxy.set_mode("forward")
        assert wait_until(lambda: store.get(key) is not None)
        assert same(store.get(key), value)
        store.close()


def test_a_blocking_put_into_a_silent_server_times_out_on_the_callers_thread(redis_server):
    """Plain SETs run on the caller's thread (``put_chunk_by``): one that gets no answer
    ends within the timeout, is counted as a timeout, and leaves nothing half-sent."""
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        store = backend_for(f"redis://127.0.0.1:{proxy.port}/0?prefix=sil{proxy.port}:")
        key, value = make_key("silent"), chunk(1)
        store.put(key, value)  # connected
        proxy.set_mode("blackhole")
        timeouts, failures = store.stats["timeouts"], store.stats["put_failures"]
        inline: list = []
        real = store.connector.put_chunk_by

        def spy(*args):
            inline.append(threading.current_thread())
            return real(*args)

        store.connector.put_chunk_by = spy  # type: ignore[method-assign]
        _, exc, elapsed = timed(lambda: store.put(make_key("silent2"), chunk(2)))
        del store.connector.put_chunk_by
        assert inline == [threading.current_thread()]  # tried on the caller's thread
        assert isinstance(exc, StoreUnavailableError) and "no answer within the timeout" in str(exc)
        assert T * 0.9 < elapsed < BOUND, elapsed  # waited out its deadline, not more
        assert store.stats["timeouts"] == timeouts + 1 and store.stats["put_failures"] == failures + 1
        proxy.set_mode("forward")
        assert wait_until(lambda: _put_ok(store, make_key("silent2"), chunk(2)))
        assert same(store.get(make_key("silent2")), chunk(2))
        assert same(store.get(key), value)
        store.close()


def test_gets_run_on_the_callers_thread_and_a_trickling_reply_ends_at_the_deadline(redis_server):
    """Gets of large values run on the caller's thread (``get_hashed_by``), sparing two
    thread hand-offs. A large reply's every read is bounded by what is left of the deadline, not each by a
    whole timeout: a reply trickling in through a delaying proxy (one 200 ms wait per
    piece of up to 1 MiB, 8 MiB in all) is given up at the deadline, a timeout and a miss."""
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        store = backend_for(f"redis://127.0.0.1:{proxy.port}/0?prefix=trk{proxy.port}:")
        small_key, small = make_key("small"), chunk(2)  # 2 KiB: its gets stay on the I/O threads
        store.put(small_key, small)
        assert same(store.get(small_key), small) and not store.connector.gets_inline()
        key, value = make_key("trickle"), chunk(1, shape=(32, 2, 64, 8, 64))  # 8 MiB float32
        store.put(key, value)
        assert same(store.get(key), value)  # shows the value size: large
        assert store.connector.gets_inline()
        inline: list = []
        real = store.connector.get_hashed_by

        def spy(*args):
            inline.append(threading.current_thread())
            return real(*args)

        store.connector.get_hashed_by = spy  # type: ignore[method-assign]
        assert same(store.get(key), value)
        assert inline == [threading.current_thread()]
        proxy.set_mode("delay", delay=0.2)
        timeouts = store.stats["timeouts"]
        got, exc, elapsed = timed(lambda: store.get(key))
        assert exc is None and got is None, exc  # a miss, never a partial chunk
        assert elapsed < BOUND, elapsed
        assert store.stats["timeouts"] == timeouts + 1
        del store.connector.get_hashed_by
        proxy.set_mode("forward")
        assert wait_until(lambda: same(store.get(key), value))
        store.close()


def _put_ok(store, key, value) -> bool:
    try:
        store.put(key, value)
    except StoreUnavailableError:
        return False  # the circuit may still be open for a moment
    return True


def test_maxmemory_noeviction_reports_full_and_reads_keep_working(redis_server_factory):
    server = redis_server_factory("--maxmemory", "6mb", "--maxmemory-policy", "noeviction")
    store = backend_for(server.url + "?prefix=full:")
    small = chunk(0)
    store.put(make_key("small"), small)
    big = torch.zeros(512 * 1024, dtype=torch.float16)  # 1 MiB
    with pytest.raises(StoreFullError):
        for i in range(20):
            store.put(make_key(f"big{i}"), big)
    # Reads of what is stored keep working while the store is full.
    got = store.get(make_key("small"))
    assert got is not None and torch.equal(got, small)
    assert store.contains(make_key("small"))
    # Non-blocking writes into a full store are counted as failures, not lost silently.
    before = store.stats["background_put_failures"]
    store.put(make_key("late"), big, blocking=False)
    assert wait_until(lambda: store.stats["background_put_failures"] > before, timeout=10 * BOUND)
    store.close()


def test_repeated_full_puts_do_not_cut_off_reads(redis_server_factory):
    """A full Redis answers promptly; it is not down, so reads must not fail fast."""
    server = redis_server_factory("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    store = backend_for(server.url + "?prefix=full2:")
    small = chunk(0)
    store.put(make_key("small"), small)
    big = torch.zeros(1024 * 1024, dtype=torch.float16)
    fulls = 0
    for i in range(8):
        try:
            store.put(make_key(f"big{i}"), big)
        except StoreFullError:
            fulls += 1
    assert fulls >= 5  # every refused put says "full", never "unavailable"
    got = store.get(make_key("small"))
    assert got is not None and torch.equal(got, small)
    store.close()


def test_planted_pickle_is_a_miss_and_never_runs(redis_server, tmp_path: Path):
    sentinel = tmp_path / "pwned"
    prefix = f"pk{uuid.uuid4().hex[:10]}:"
    # A hand-written protocol-0 pickle that would run os.system("touch <sentinel>") if
    # anything unpickled it (built by hand: the project never imports pickle).
    evil = b"cposix\nsystem\n(S'touch " + str(sentinel).encode() + b"'\ntR."
    # ... and the same behind a safetensors-looking header, checksum and all made up.
    header = (
        b'{"__metadata__":{"lmcache.format":"1","lmcache.checksum":"xxh3_128:00",'
        b'"lmcache.key":"x"},"kv_chunk":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}'
        % (len(evil), len(evil))
    )
    disguised = len(header).to_bytes(8, "little") + header + evil
    keys = [make_key("evil1"), make_key("evil2")]
    with redis_server.client() as raw:
        raw.set(prefix.encode() + keys[0].to_string().encode(), evil)
        raw.set(prefix.encode() + keys[1].to_string().encode(), disguised)
    for pipelined in (False, True):
        store = backend_for(redis_server.url + "?prefix=" + prefix, pipelined=pipelined)
        for key in keys:
            assert store.get(key) is None
            assert store.read_header(key) is None
        assert store.batched_get(keys) == [None, None]
        store.close()
    assert not sentinel.exists()


def test_dead_server_at_open_does_not_block_construction():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    start = time.monotonic()
    store = backend_for(url)
    assert store.get(make_key(1)) is None
    with pytest.raises(StoreUnavailableError):
        store.put(make_key(1), chunk(1))
    store.close()
    assert time.monotonic() - start < 3 * BOUND


def test_dead_cluster_at_open_does_not_block_construction():
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    start = time.monotonic()
    store = backend_for(url)
    assert store.get(make_key(1)) is None
    with pytest.raises(StoreUnavailableError):
        store.put(make_key(1), chunk(1))
    store.close()
    assert time.monotonic() - start < 3 * BOUND
