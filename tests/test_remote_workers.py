"""The remote tier's background loops have the seed's shape and are the ones that run.

In LMCache, ``LMCRemoteBackend.put_worker()``, ``LMCPipelinedRemoteBackend.network_worker()``
and ``deserialize_worker()`` take no arguments: they are the bodies of background
threads. These tests check that ours are too (writer threads run ``put_worker()``,
the pipelined ``batched_get`` goes through fetch threads running ``network_worker()``
and decode threads running ``deserialize_worker()``), and that the guarantees
around them hold against real Redis and S3 servers: per-key write order, close()
draining every acknowledged write, batches aligned with their keys under
concurrent callers, and a dead remote answered with misses counted once.
"""

from __future__ import annotations

import inspect
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
from tests.conftest import make_key
from tests.test_conformance import chunk, same

REMOTES = ["redis", "s3"]


def _prefix(tmp_path: Path) -> str:
    import hashlib

    return "lmc-w-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]


@pytest.fixture(params=REMOTES)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(remote_url, connector options) of a private namespace on a real server."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return f"{server.url}?prefix={quote(_prefix(tmp_path) + ':')}", {}
    server = request.getfixturevalue("s3_server")
    return server.url(_prefix(tmp_path)), dict(server.options)


def _open(
    cls: type[LMCRemoteBackend], remote: tuple[str, dict[str, Any]], timeout: float = 10.0, **kwargs: Any
) -> LMCRemoteBackend:
    url, options = remote
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=timeout)
    return cls(cfg, None, "cpu", **options, **kwargs)


def _ours(threads: set[threading.Thread], prefix: str) -> set[threading.Thread]:
    return {t for t in threads if t.name.startswith(prefix)}


def _alive(threads: set[threading.Thread]) -> set[threading.Thread]:
    # The thread objects, not their names: another backend (an earlier test's, still
    # closing) has threads with the same names.
    return {t for t in threads if t.is_alive()}


# -- the seed's signatures ---------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [LMCRemoteBackend.put_worker, LMCPipelinedRemoteBackend.network_worker, LMCPipelinedRemoteBackend.deserialize_worker],
    ids=["put_worker", "network_worker", "deserialize_worker"],
)
def test_worker_loops_take_no_arguments_like_the_seed(method: Any) -> None:
    assert list(inspect.signature(method).parameters) == ["self"]


# -- put_worker: the writer threads' loop ----------------------------------------------------


class _RecordingWriters(LMCRemoteBackend):
    """A real remote backend that notes which threads enter ``put_worker()``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.writer_threads: set[threading.Thread] = set()
        super().__init__(*args, **kwargs)

    def put_worker(self) -> None:
        self.writer_threads.add(threading.current_thread())
        super().put_worker()


def test_put_worker_is_the_loop_of_every_writer_thread(remote: tuple[str, dict[str, Any]]) -> None:
    backend = _open(_RecordingWriters, remote, put_workers=3)
    assert isinstance(backend, _RecordingWriters)
    try:
        items = [(make_key(f"w{i}"), chunk(i)) for i in range(9)]
        for key, value in items:
            backend.put(key, value, blocking=False)
        # each writer thread entered put_worker() with no arguments and found its own queue
        deadline = time.monotonic() + 30
        while len(backend.writer_threads) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        writers = set(backend.writer_threads)
        assert len(writers) == 3 and writers == _ours(writers, "lmcache-remote-put-")
        assert _alive(writers) == writers
        # a thread that is not one of the backend's writers cannot run the loop
        with pytest.raises(RuntimeError, match="writer threads"):
            backend.put_worker()
    finally:
        backend.close()
    assert _alive(writers) == set()  # every loop returned on the end signal
    assert backend.stats["background_put_failures"] == 0
    reader = _open(LMCRemoteBackend, remote)
    try:
        for key, value in items:
            assert same(reader.get(key), value), key
    finally:
        reader.close()


def test_nonblocking_writes_of_one_key_land_in_the_order_made(remote: tuple[str, dict[str, Any]]) -> None:
    backend = _open(LMCRemoteBackend, remote, put_workers=4)
    hot = make_key("hot")
    others = [make_key(f"o{i}") for i in range(12)]
    try:
        for v in range(12):
            backend.put(hot, chunk(100 + v), blocking=False)
            backend.put(others[v], chunk(v), blocking=False)
            assert same(backend.get(hot), chunk(100 + v))  # read-your-writes while queued
    finally:
        backend.close()
    reader = _open(LMCRemoteBackend, remote)
    try:
        assert same(reader.get(hot), chunk(111))  # the last write wins, never an older one
        assert all(same(reader.get(k), chunk(i)) for i, k in enumerate(others))
    finally:
        reader.close()


@pytest.mark.parametrize("cls", [LMCRemoteBackend, LMCPipelinedRemoteBackend], ids=["plain", "pipelined"])
def test_close_drains_every_acknowledged_nonblocking_put(
    remote: tuple[str, dict[str, Any]], cls: type[LMCRemoteBackend]
) -> None:
    backend = _open(cls, remote, put_workers=2)
    items = [(make_key(f"d{i}"), chunk(i)) for i in range(16)]
    assert backend.batched_put(items, blocking=False) == len(items)
    backend.close()
    assert backend.stats["background_put_failures"] == 0
    assert backend.stats["dropped_on_close"] == 0
    reader = _open(cls, remote)
    try:
        got = reader.batched_get([k for k, _ in items])
        assert all(same(g, v) for g, (_, v) in zip(got, items, strict=True))
    finally:
        reader.close()


# -- network_worker / deserialize_worker: the pipeline's two stages ---------------------------


class _RecordingStages(LMCPipelinedRemoteBackend):
    """A real pipelined backend that notes which threads enter its stage loops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fetchers: set[threading.Thread] = set()
        self.decoders: set[threading.Thread] = set()
        super().__init__(*args, **kwargs)

    def network_worker(self) -> None:
        self.fetchers.add(threading.current_thread())
        super().network_worker()

    def deserialize_worker(self) -> None:
        self.decoders.add(threading.current_thread())
        super().deserialize_worker()


def test_batched_get_runs_through_the_network_and_deserialize_loops(remote: tuple[str, dict[str, Any]]) -> None:
    backend = _open(_RecordingStages, remote, fetch_parallelism=3, fetch_workers=4, decode_workers=2)
    assert isinstance(backend, _RecordingStages)
    try:
        stored = {make_key(f"s{i}"): chunk(i) for i in range(7)}
        for k, v in stored.items():
            backend.put(k, v)
        corrupt = make_key("corrupt")
        backend.connector.put(corrupt, [b"not a chunk at all"])  # a real object that fails decoding
        keys = [*list(stored)[:3], make_key("absent"), corrupt, *list(stored)[3:]]
        got = backend.batched_get(keys)
        assert len(got) == len(keys)
        for k, g in zip(keys, got, strict=True):
            if k in stored:
                assert same(g, stored[k]), k
            else:
                assert g is None, k
        assert backend.stats["corrupt"] == 1
        fetchers, decoders = set(backend.fetchers), set(backend.decoders)
        assert len(fetchers) == 4 and fetchers == _ours(fetchers, "lmcache-remote-fetch-")
        assert len(decoders) == 2 and decoders == _ours(decoders, "lmcache-remote-decode-")
        assert _alive(fetchers | decoders) == fetchers | decoders
    finally:
        backend.close()
    assert _alive(fetchers | decoders) == set()  # both loops returned on the end signal


def test_pipelined_batches_stay_aligned_under_concurrent_callers(remote: tuple[str, dict[str, Any]]) -> None:
    backend = _open(LMCPipelinedRemoteBackend, remote, fetch_parallelism=3)
    try:
        stored = {make_key(f"c{i}"): chunk(i) for i in range(10)}
        for k, v in stored.items():
            backend.put(k, v)
        absent = [make_key(f"missing{i}") for i in range(4)]
        errors: list[BaseException] = []

        def caller(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(4):
                    keys: list[CacheEngineKey] = list(stored) + absent
                    rng.shuffle(keys)
                    keys = keys[: rng.randint(1, len(keys))]
                    got = backend.batched_get(keys)
                    assert len(got) == len(keys)
                    for k, g in zip(keys, got, strict=True):
                        assert same(g, stored[k]) if k in stored else g is None, k
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    finally:
        backend.close()


@pytest.fixture
def blackholed_redis(redis_server: Any) -> Iterator[tuple[Any, str]]:
    from tests.tcp_proxy import TcpProxy

    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        yield proxy, f"redis://127.0.0.1:{proxy.port}/0?prefix=bh{proxy.port}:"


def test_a_batch_against_a_silent_remote_is_misses_counted_once(blackholed_redis: tuple[Any, str]) -> None:
    proxy, url = blackholed_redis
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=0.5)
    backend = LMCPipelinedRemoteBackend(cfg, None, "cpu", fetch_parallelism=2)
    try:
        keys = [make_key(f"b{i}") for i in range(5)]
        for i, k in enumerate(keys):
            backend.put(k, chunk(i))
        proxy.set_mode("blackhole")
        misses = backend.stats["misses"]
        assert backend.batched_get(keys) == [None] * len(keys)
        # each group is a miss exactly once, whether the caller's deadline or the
        # fetch's own timeout came first (a late stage never counts it again)
        assert backend.stats["misses"] - misses == len(keys)
        assert backend.stats["timeouts"] + backend.stats["unavailable"] >= 1
        proxy.set_mode("forward")  # the remote comes back: the stages serve again
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = backend.batched_get(keys)
            if all(g is not None for g in got):
                break
            time.sleep(0.1)
        assert all(same(g, chunk(i)) for i, g in enumerate(got))
    finally:
        backend.close()


def _large(i: int) -> Any:
    import torch

    return torch.full((300_000,), float(i), dtype=torch.float16)  # 600 kB: one key per Redis group


def test_regression_a_slow_batch_is_not_cut_off_at_one_remote_timeout(redis_server: Any) -> None:
    """A live remote that answers every group well within ``remote_timeout`` serves the
    whole batch, though the batch takes several timeouts: the deadline is the time
    without progress. (It was one ``remote_timeout`` for the whole batch: 48 x 4 MiB
    from moto with a 0.5 s timeout came back all misses, a timeout and a strike.)"""
    from lmcache_core.storage_backend.circuit import CircuitBreaker
    from tests.tcp_proxy import TcpProxy

    timeout = 1.0
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0?prefix=slow{proxy.port}:"
        keys = [make_key(f"slow{i}") for i in range(16)]
        writer = LMCRemoteBackend(LMCacheEngineConfig(local_device=None, remote_url=url), None, "cpu")
        try:
            for i, k in enumerate(keys):
                writer.put(k, _large(i))
        finally:
            writer.close()
        cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=timeout)
        breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60.0)
        backend = LMCPipelinedRemoteBackend(cfg, None, "cpu", fetch_parallelism=2, breaker=breaker)
        try:
            # Open both connections now (a handshake is several round trips), and show
            # the value size: one key per group from here on.
            assert all(same(g, _large(i)) for i, g in enumerate(backend.batched_get(keys[:2])))
            assert backend.connector.fetch_group_keys() == 1
            # Each forwarded piece waits 0.1 s: a group (one 600 kB GET, a few pieces)
            # takes 0.2-0.4 s, and the batch, 8 groups after one another on each of
            # two connections, about twice the timeout.
            proxy.set_mode("delay", delay=0.1)
            hits, misses = backend.stats["hits"], backend.stats["misses"]
            got = backend.batched_get(keys)
            assert [i for i, g in enumerate(got) if g is None] == []
            assert all(same(g, _large(i)) for i, g in enumerate(got))
            assert backend.stats["hits"] - hits == len(keys) and backend.stats["misses"] == misses
            assert backend.stats["timeouts"] == 0 and backend.stats["unavailable"] == 0
            assert breaker.consecutive_failures == 0 and breaker.times_opened == 0
        finally:
            proxy.set_mode("forward")
            backend.close()


def test_a_cold_batch_of_large_values_is_fetched_in_groups_of_bounded_bytes(
    remote: tuple[str, dict[str, Any]],
) -> None:
    """Until a read shows the value size, a batch is not split into a few huge groups
    (each would take as long as the whole batch, and the first could not arrive
    within one ``remote_timeout``): single keys first, then at most
    ``FETCH_GROUP_BYTES`` of values a group."""
    import torch

    from lmcache_core.storage_backend.remote_backend import FETCH_GROUP_BYTES

    value = lambda i: torch.full((2_500_000,), float(i), dtype=torch.float16)  # noqa: E731  (5 MB)
    keys = [make_key(f"cold{i}") for i in range(8)]
    writer = _open(LMCRemoteBackend, remote)
    try:
        for i, k in enumerate(keys):
            writer.put(k, value(i))
    finally:
        writer.close()
    backend = _open(LMCPipelinedRemoteBackend, remote, fetch_parallelism=2)
    try:
        real = backend.connector.get_many
        groups: list[int] = []

        def recording(ks: Any) -> Any:
            groups.append(len(ks))
            return real(ks)

        backend.connector.get_many = recording  # type: ignore[method-assign]
        got = backend.batched_get(keys)
        assert all(same(g, value(i)) for i, g in enumerate(got))
        assert sum(groups) == len(keys)
        assert groups[:2] == [1, 1]  # what the split was before a read: [4, 4]
        assert max(groups) * 5_000_000 <= FETCH_GROUP_BYTES
    finally:
        backend.close()


def test_a_streamed_batch_teaches_the_connector_the_value_size(tmp_path: Path) -> None:
    """Chunks of a local-directory remote are read past ``get_many`` (``open_stream``):
    the backend reports their size to the connector, which sizes the next groups."""
    cfg = LMCacheEngineConfig(local_device=None, remote_url=f"file://{tmp_path / 'remote'}", remote_timeout=10.0)
    backend = LMCPipelinedRemoteBackend(cfg, None, "cpu", fetch_parallelism=2)
    try:
        assert backend.connector.streams and backend.connector.learned_value_bytes() is None
        keys = [make_key(f"f{i}") for i in range(4)]
        for i, k in enumerate(keys):
            backend.put(k, chunk(i))
        got = backend.batched_get(keys)
        assert all(same(g, chunk(i)) for i, g in enumerate(got))
        assert backend.connector.learned_value_bytes() == chunk(0).nbytes
    finally:
        backend.close()


def test_a_remote_that_goes_silent_mid_batch_ends_it_one_timeout_after_the_last_progress(
    blackholed_redis: tuple[Any, str],
) -> None:
    """Groups already served stay hits; the rest are misses one ``remote_timeout`` after
    the remote stopped answering, not one timeout per group left."""
    proxy, url = blackholed_redis
    timeout = 0.5
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=timeout)
    backend = LMCPipelinedRemoteBackend(cfg, None, "cpu", fetch_parallelism=2)
    try:
        keys = [make_key(f"s{i}") for i in range(20)]
        for i, k in enumerate(keys):
            backend.put(k, _large(i))
        backend.batched_get(keys[:1])  # a read shows the value size: one key per group
        real = backend.connector.get_many
        calls = [0]
        lock = threading.Lock()

        def going_silent(ks: Any) -> Any:
            with lock:
                calls[0] += 1
                if calls[0] == 5:  # four groups served, then the remote stops answering
                    proxy.set_mode("blackhole")
            return real(ks)

        backend.connector.get_many = going_silent  # type: ignore[method-assign]
        counted = backend.stats["hits"] + backend.stats["misses"]
        started = time.monotonic()
        got = backend.batched_get(keys)
        elapsed = time.monotonic() - started
        # Generous: ten groups after one another, a timeout each, would be 5 s.
        assert elapsed < 4 * timeout, elapsed
        assert all(g is None or same(g, _large(i)) for i, g in enumerate(got))
        assert sum(g is not None for g in got) >= 3  # served before the silence (one may race it)
        assert got[-1] is None
        assert backend.stats["hits"] + backend.stats["misses"] - counted == len(keys)  # each once
        assert backend.stats["timeouts"] >= 1
        assert backend.breaker.consecutive_failures >= 1
    finally:
        proxy.set_mode("forward")
        backend.close()


def test_a_batch_fetches_at_most_fetch_parallelism_groups_at_once(remote: tuple[str, dict[str, Any]]) -> None:
    """Large Redis values go one GET per group; no remote sees more than the window at once."""
    import torch

    backend = _open(LMCPipelinedRemoteBackend, remote, fetch_parallelism=2, fetch_workers=5)
    try:
        stored = {make_key(f"w{i}"): torch.full((300_000,), float(i), dtype=torch.float16) for i in range(7)}
        for k, v in stored.items():  # 600 kB each: over half of Redis's 1 MiB per MGET
            backend.put(k, v)
        backend.batched_get([next(iter(stored))])  # a read shows the value size (connector and batch)
        real = backend.connector.get_many
        state = {"now": 0, "peak": 0, "groups": [], "lock": threading.Lock()}

        def counting(keys: Any) -> Any:
            with state["lock"]:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
                state["groups"].append(len(keys))
            try:
                time.sleep(0.05)  # hold the slot long enough for the others to pile up
                return real(keys)
            finally:
                with state["lock"]:
                    state["now"] -= 1

        backend.connector.get_many = counting  # type: ignore[method-assign]
        keys = [*list(stored)[:4], make_key("absent"), *list(stored)[4:]]
        got = backend.batched_get(keys)
        for k, g in zip(keys, got, strict=True):
            assert same(g, stored[k]) if k in stored else g is None, k
        assert state["peak"] == 2  # the window, though five fetch threads were idle
        assert sum(state["groups"]) == len(keys)
        if remote[0].startswith("redis"):
            assert state["groups"] == [1] * len(keys)
        else:  # fsspec's get_many is concurrent itself: two even groups
            assert sorted(state["groups"]) == [4, 4]
    finally:
        backend.close()


def test_groups_of_a_batch_fail_fast_once_the_circuit_opens(redis_server_private: Any) -> None:
    """A dead remote: after the breaker opens, the call's remaining groups are not sent."""
    import torch

    from lmcache_core.storage_backend.circuit import CircuitBreaker
    from lmcache_core.storage_backend.remote_backend import RetryPolicy

    cfg = LMCacheEngineConfig(local_device=None, remote_url=f"{redis_server_private.url}?prefix=ff:", remote_timeout=5.0)
    backend = LMCPipelinedRemoteBackend(
        cfg, None, "cpu", fetch_parallelism=1,
        retry=RetryPolicy(attempts=1), breaker=CircuitBreaker(failure_threshold=2, reset_timeout=60.0),
    )  # fmt: skip
    try:
        keys = [make_key(f"f{i}") for i in range(6)]
        for i, k in enumerate(keys):
            backend.put(k, torch.full((300_000,), float(i), dtype=torch.float16))  # one key per group
        backend.get(keys[0])  # learn the value size
        calls: list[int] = []
        real = backend.connector.get_many

        def counting(ks: Any) -> Any:
            calls.append(len(ks))
            return real(ks)

        backend.connector.get_many = counting  # type: ignore[method-assign]
        redis_server_private.stop()
        started = time.monotonic()
        assert backend.batched_get(keys) == [None] * len(keys)
        assert time.monotonic() - started < 5.0  # refused connections: no wait for the deadline
        assert calls == [1, 1]  # two failures opened the circuit; four groups were never sent
        assert backend.stats["circuit_rejections"] == 4
        assert backend.stats["misses"] >= len(keys)
    finally:
        backend.close()


def test_a_batch_queued_behind_others_waits_its_turn_instead_of_timing_out(redis_server: Any) -> None:
    """Each fetch thread serves one batch to its end: a third caller behind two batches
    that took longer than remote_timeout (group after group, each within it) got all
    misses from a healthy remote, and a strike against its circuit. Waiting in the
    fetch queue is not the remote failing to answer."""
    url = f"{redis_server.url}?prefix=queued{uuid.uuid4().hex[:8]}:"
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=0.3)
    backend = LMCPipelinedRemoteBackend(cfg, None, "cpu", fetch_parallelism=1, fetch_workers=2)
    try:
        keys = [make_key(f"q{i}") for i in range(12)]
        for i, k in enumerate(keys):
            backend.put(k, chunk(i))
        real = backend.connector.get_many

        def slow_remote(batch: Any) -> Any:
            time.sleep(0.1)  # each group answers well within the timeout; 12 groups do not
            return real(batch)

        backend.connector.get_many = slow_remote  # type: ignore[method-assign]
        backend.connector.fetch_group_keys = lambda: 1  # type: ignore[method-assign]
        with ThreadPoolExecutor(3) as pool:
            batches = [pool.submit(backend.batched_get, keys) for _ in range(3)]
            results = [b.result(timeout=60) for b in batches]
        for got in results:
            assert all(same(g, chunk(i)) for i, g in enumerate(got))
        assert backend.stats["timeouts"] == 0 and backend.stats["queue_timeouts"] == 0
        assert backend.breaker.consecutive_failures == 0  # no strike against the circuit
    finally:
        backend.close()


def test_close_during_a_batch_ends_it_at_once_as_misses(redis_server: Any) -> None:
    """close() stopped the stages with fetched groups still undecoded: the caller then
    waited out its whole remote_timeout, and counted the remote's timeouts."""
    url = f"{redis_server.url}?prefix=closing{uuid.uuid4().hex[:8]}:"
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=30.0)
    backend = LMCPipelinedRemoteBackend(cfg, None, "cpu", fetch_parallelism=1)
    keys = [make_key(f"c{i}") for i in range(4)]
    for i, k in enumerate(keys):
        backend.put(k, chunk(i))
    decoding, release = threading.Event(), threading.Event()
    real = backend._decode_group

    def held_decode(*args: Any) -> Any:
        decoding.set()
        release.wait(60)
        return real(*args)

    backend._decode_group = held_decode  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as pool:
        batch = pool.submit(backend.batched_get, keys)
        assert decoding.wait(10)  # a group was fetched; its decode is held
        started = time.monotonic()
        backend.close()
        got = batch.result(timeout=60)
        waited = time.monotonic() - started
        release.set()
    assert len(got) == len(keys) and waited < 15.0  # not the 30 s remote_timeout
    assert backend.stats["timeouts"] == 0 and backend.breaker.consecutive_failures == 0
