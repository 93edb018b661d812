"""Remote audit 6: the remote tier's close(), its calls' deadlines and circuit strikes.

Each test is a regression for a defect found by this audit (see the docstrings), run
against real servers (Redis, moto's S3) through a fault-injecting TCP proxy where a
fault is needed. Bounds are generous "returns within N seconds" checks, never
performance assertions.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import torch

from lmcache_core import CacheEngineKey, LMCacheEngineConfig
from lmcache_core.storage_backend.circuit import CircuitBreaker
from lmcache_core.storage_backend.remote_backend import (
    LMCPipelinedRemoteBackend,
    LMCRemoteBackend,
    RetryPolicy,
)
from tests.conftest import make_key, wait_until
from tests.tcp_proxy import TcpProxy

T = 0.5  # remote_timeout: short, so dead-server paths stay fast
SHAPE = (2, 2, 16, 2, 8)


def chunk(value: float) -> torch.Tensor:
    return torch.full(SHAPE, float(value), dtype=torch.float16)


def redis_url(port: int, prefix: str) -> str:
    return f"redis://127.0.0.1:{port}/0?prefix={prefix}"


def remote(url: str, pipelined: bool = False, cls: type[LMCRemoteBackend] | None = None, **kw: Any) -> LMCRemoteBackend:
    cls = cls or (LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend)
    kw.setdefault("breaker", CircuitBreaker(failure_threshold=3, reset_timeout=0.5, name="audit6"))
    return cls(LMCacheEngineConfig(remote_url=url, remote_timeout=kw.pop("timeout", T)), None, "cpu", **kw)


# -- defect 1: a second close() returned while the first was still draining -------------


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_a_second_close_returns_only_once_the_queued_writes_are_stored(redis_server, pipelined):
    """close() promises every acknowledged write is stored when it returns. A close()
    made while another thread's close() was draining (the exit drain racing a
    shutdown hook, two owners of one backend) returned at once, with 30 queued
    writes still unsent: the caller then exited or read the store and lost them."""
    prefix = f"audit6-{uuid.uuid4().hex[:8]}:"
    keys = [make_key(f"drain-{i}") for i in range(30)]
    with TcpProxy(("127.0.0.1", redis_server.port), mode="delay", delay=0.05) as proxy:
        store = remote(redis_url(proxy.port, prefix), pipelined, timeout=5.0)
        for i, k in enumerate(keys):
            store.put(k, chunk(i), blocking=False)
        first = threading.Thread(target=store.close, name="first-close")
        first.start()
        try:
            assert wait_until(lambda: store._closed, timeout=5)
            assert first.is_alive()  # still draining through the slow proxy
            store.close()
            # Everything acknowledged is on the server now, read past the proxy.
            check = remote(redis_url(redis_server.port, prefix), timeout=5.0)
            try:
                assert [check.contains(k) for k in keys] == [True] * len(keys)
            finally:
                check.close()
        finally:
            first.join(timeout=20)
        assert not first.is_alive()
        assert store.stats.snapshot().get("dropped_on_close", 0) == 0


# -- defect 2: a timed-out call counted twice against the circuit -----------------------


@pytest.mark.parametrize("op", ["contains", "get"])
def test_a_call_that_times_out_is_one_strike_against_the_circuit(s3_server, op):
    """The caller's wait struck the circuit at the deadline, and the try still running
    on the I/O thread struck it again when the client's own timeout ended it: each
    call to a blackholed S3 counted two consecutive failures, so a circuit set to open
    after 3 failures opened after the second call."""
    with TcpProxy(("127.0.0.1", s3_server.port)) as proxy:
        options = {**s3_server.options, "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        breaker = CircuitBreaker(failure_threshold=3, reset_timeout=30, name="audit6")
        store = remote(
            s3_server.url(f"audit6-{uuid.uuid4().hex[:8]}"),
            breaker=breaker,
            retry=RetryPolicy(attempts=1),
            **options,
        )
        try:
            proxy.set_mode("blackhole")
            for i in range(2):
                started = time.monotonic()
                if op == "contains":
                    assert store.contains(make_key(f"absent-{i}")) is False
                else:
                    assert store.get(make_key(f"absent-{i}")) is None
                assert time.monotonic() - started < 5 * T + 2
            time.sleep(4 * T)  # the tries left running end (the client's own timeout)
            assert breaker.consecutive_failures == 2
            assert breaker.state == "closed"
            assert store.stats.snapshot().get("timeouts", 0) == 2
        finally:
            proxy.set_mode("forward")
            store.close()


# -- defect 3: calls racing close() waited out their deadline (or ten) for no thread ----


class _Paused:
    """Holds a call at a point after its open-check until the test lets it go."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()

    def hold(self) -> None:
        self.reached.set()
        assert self.go.wait(20)


class _PausingPipelined(LMCPipelinedRemoteBackend):
    pause_on: CacheEngineKey | None = None
    paused = _Paused()

    def _stale_miss(self, key: CacheEngineKey) -> bool:
        if key == self.pause_on:
            self.paused.hold()
        return super()._stale_miss(key)


class _PausingPlain(LMCRemoteBackend):
    paused = _Paused()
    pause_what: str | None = None

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        if what == self.pause_what:
            self.paused.hold()
        return super()._call(what, fn, *args, **kw)


def test_a_batched_get_racing_close_returns_at_once(redis_server):
    """A pipelined batched_get that passed its open-check as another thread's close()
    stopped the fetch stage registered its call after close() had ended the calls in
    flight: no fetch thread was left, and it waited START_WAIT_TIMEOUTS (10) timeouts
    before returning its misses."""
    prefix = f"audit6-{uuid.uuid4().hex[:8]}:"
    store = remote(redis_url(redis_server.port, prefix), cls=_PausingPipelined)
    assert isinstance(store, _PausingPipelined)
    keys = [make_key("racer-0"), make_key("racer-1")]
    store.put(keys[0], chunk(1))
    assert store.batched_get(keys)[0] is not None  # the stages run
    store.pause_on = keys[1]
    store.paused = _Paused()
    out: dict[str, Any] = {}

    def batch() -> None:
        started = time.monotonic()
        out["result"] = store.batched_get(keys)
        out["took"] = time.monotonic() - started

    racer = threading.Thread(target=batch)
    racer.start()
    assert store.paused.reached.wait(10)
    store.close()
    resumed = time.monotonic()
    store.paused.go.set()
    racer.join(timeout=10 * T + 5)
    assert not racer.is_alive()
    assert out["result"] == [None, None]
    assert time.monotonic() - resumed < 4 * T + 1  # not START_WAIT_TIMEOUTS x T = 5 s
    assert store.stats.snapshot().get("queue_timeouts", 0) == 0


def test_a_call_racing_close_fails_at_once_without_striking_the_circuit(redis_server):
    """A contains() that passed its open-check as close() shut the I/O threads down
    queued its call where no thread would run it, waited its whole timeout, and counted
    a timeout and a strike against the circuit: an outage that never happened."""
    prefix = f"audit6-{uuid.uuid4().hex[:8]}:"
    store = remote(redis_url(redis_server.port, prefix), cls=_PausingPlain)
    assert isinstance(store, _PausingPlain)
    assert store.contains(make_key("warm")) is False
    store.pause_what = "exists"
    store.paused = _Paused()
    out: dict[str, Any] = {}
    racer = threading.Thread(target=lambda: out.setdefault("found", store.contains(make_key("racer"))))
    racer.start()
    assert store.paused.reached.wait(10)
    store.close()
    store.paused.go.set()
    racer.join(timeout=10)
    assert not racer.is_alive()
    assert out["found"] is False
    assert store.breaker.consecutive_failures == 0
    assert store.stats.snapshot().get("timeouts", 0) == 0


def test_a_pipelined_batch_that_times_out_is_one_strike_against_the_circuit(redis_server):
    """A pipelined batched_get on a server that stopped answering struck the circuit at
    its deadline, and its fetch, still running until the client's socket timeout, struck
    it again when it failed: two strikes per batch (five for a default batch of four
    groups), so a circuit set to open after 3 failures opened on the second batch."""
    prefix = f"audit6-{uuid.uuid4().hex[:8]}:"
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        breaker = CircuitBreaker(failure_threshold=3, reset_timeout=30, name="audit6")
        store = remote(
            redis_url(proxy.port, prefix), pipelined=True, breaker=breaker, retry=RetryPolicy(attempts=1),
            fetch_parallelism=1,
        )
        try:
            keys = [make_key(f"batch-{i}") for i in range(3)]
            for i, k in enumerate(keys):
                store.put(k, chunk(i))
            proxy.set_mode("blackhole")
            for _ in range(2):
                started = time.monotonic()
                assert store.batched_get(keys) == [None, None, None]
                assert time.monotonic() - started < 4 * T + 2
            time.sleep(4 * T)  # the fetches left running end (the client's socket timeout)
            assert breaker.consecutive_failures == 2
            assert breaker.state == "closed"
        finally:
            proxy.set_mode("forward")
            store.close()


# -- defect 5: the plain batched_get dropped queued writes once the remote failed -------


def test_a_plain_batched_get_still_sees_queued_writes_after_the_remote_fails(redis_server):
    """LMCRemoteBackend.batched_get made every key after the first failed one a miss at
    once, queued writes of this process included: get(k) answered the queued chunk,
    batched_get([other, k]) answered None (read-your-writes broken), while the pipelined
    twin answered it."""
    prefix = f"audit6-{uuid.uuid4().hex[:8]}:"
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        breaker = CircuitBreaker(failure_threshold=100, reset_timeout=30, name="audit6")
        store = remote(redis_url(proxy.port, prefix), breaker=breaker, put_workers=1, close_timeout=T)
        try:
            stored, queued = make_key("stored"), make_key("queued")
            store.put(stored, chunk(1))
            proxy.set_mode("blackhole")
            for i in range(6):  # the one writer is held on these, T each, before `queued`
                store.put(make_key(f"filler-{i}"), chunk(10 + i), blocking=False)
            store.put(queued, chunk(7), blocking=False)
            got = store.batched_get([stored, queued, make_key("absent")])
            assert got[0] is None and got[2] is None  # the remote does not answer
            assert got[1] is not None and torch.equal(got[1], chunk(7))
            assert store.get(queued) is not None
        finally:
            proxy.set_mode("forward")
            store.close()
