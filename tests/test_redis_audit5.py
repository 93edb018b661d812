"""Redis audit 5: the Redis connector against servers that refuse, and pools that run out.

Each test is a regression for a defect found by this audit (see the docstrings). Real
redis-server processes; bounds are generous "returns within N seconds" checks, never
performance assertions.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import pytest
import torch

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.storage_backend.circuit import CLOSED, CircuitBreaker
from lmcache_core.storage_backend.connector.redis_connector import RedisConnector, StoreDeniedError
from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
from tests.conftest import make_key, wait_until
from tests.servers_redis import RedisServer

T = 0.5  # remote_timeout: short, so a wrongly opened circuit would show at once
SMALL = (2, 2, 16, 2, 8)  # 2 KiB float16
MID = (8, 2, 64, 8, 64)  # 1 MiB: a plain SET, sent on the caller's thread
LARGE = (32, 2, 64, 8, 64)  # 4 MiB: a staged put, by an I/O thread


def chunk(seed: int, shape: tuple[int, ...] = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.float16)


def same(got: torch.Tensor | None, expected: torch.Tensor) -> bool:
    return got is not None and torch.equal(got, expected)


def backend_for(url: str, pipelined: bool = False) -> LMCRemoteBackend:
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    cfg = LMCacheEngineConfig(remote_url=url, remote_timeout=T)
    # Opens after 3 failures in a row, for 30 s: a strike too many would show.
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=30, name="audit5")
    return cls(cfg, None, "cpu", breaker=breaker, list_timeout=4 * T)


def _fill(url: str, values: dict[Any, torch.Tensor]) -> None:
    writer = backend_for(url)
    for key, value in values.items():
        writer.put(key, value)
    writer.close()


def _refused_puts_leave_reads_alone(store: LMCRemoteBackend, values: dict[Any, torch.Tensor]) -> None:
    """Six refused puts (inline SETs, and a staged one on an I/O thread): each raises a
    StoreUnavailableError at once and is counted; the circuit stays closed and every
    read still hits."""
    for i in range(6):
        shape = LARGE if i == 5 else MID if i % 2 else SMALL
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            store.put(make_key(f"refused{i}"), chunk(i, shape))
        assert isinstance(info.value, PermissionError), info.value
        assert time.monotonic() - started < 3 * T  # an answer, not a wait
        assert store.breaker.state == CLOSED
    assert store.stats["put_failures"] == 6
    assert store.stats["remote_errors"] == 0 and store.stats["retries"] == 0  # a refusal is not retried
    for key, value in values.items():
        assert same(store.get(key), value), key
    assert all(same(t, v) for t, v in zip(store.batched_get(list(values)), values.values(), strict=True))
    assert store.contains(next(iter(values)))


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_puts_an_acl_refuses_do_not_open_the_circuit_on_reads_that_work(redis_server_private, pipelined):
    """Defect: a ``NOPERM`` reply (an ACL user allowed to read but not write) became a plain
    ``StoreUnavailableError``: each refused put was retried three times and counted as an
    outage, so three refused puts opened the circuit and every read, which the server
    would have served, was a miss for the circuit's whole cooldown. Now ``StoreDeniedError``
    (also a ``PermissionError``): the remote answered, no retry, no strike."""
    server = redis_server_private
    prefix = f"acl{uuid.uuid4().hex[:6]}:"
    values = {make_key("small"): chunk(0), make_key("mid"): chunk(1, MID)}
    _fill(f"{server.url}?prefix={prefix}", values)
    with server.client() as c:
        c.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+@connection")
    store = backend_for(f"redis://reader:pw@127.0.0.1:{server.port}/0?prefix={prefix}", pipelined)
    assert same(store.get(make_key("mid")), values[make_key("mid")])  # learns the size: inline gets
    _refused_puts_leave_reads_alone(store, values)
    store.close()


def test_a_read_an_acl_refuses_is_a_miss_and_no_strike(redis_server_private):
    """The same for reads: a ``GET`` an ACL refuses is a miss, neither retried nor held
    against the circuit (another rank's keys stay readable)."""
    server = redis_server_private
    _fill(f"{server.url}?prefix=open:", {make_key("ok"): chunk(0)})
    _fill(f"{server.url}?prefix=shut:", {make_key("no"): chunk(1)})
    with server.client() as c:
        c.execute_command("ACL", "SETUSER", "half", "on", ">pw", "~open:*", "+@all")
    url = f"redis://half:pw@127.0.0.1:{server.port}/0"
    shut, opened = backend_for(url + "?prefix=shut:"), backend_for(url + "?prefix=open:")
    for _ in range(5):
        assert shut.get(make_key("no")) is None
    assert shut.breaker.state == CLOSED and shut.stats["remote_errors"] == 0
    with pytest.raises(StoreDeniedError):
        shut.connector.get(make_key("no"))
    assert same(opened.get(make_key("ok")), chunk(0))
    shut.close()
    opened.close()


def test_puts_into_a_read_only_replica_do_not_open_the_circuit(redis_server_factory):
    """Defect: a replica's ``READONLY`` reply counted as an outage (retried, a strike), so
    pointing the cache at a replica, or a primary demoted by a failover, shut off its
    reads too. Now refused like an ACL's ``NOPERM``."""
    primary = redis_server_factory()
    replica: RedisServer = redis_server_factory("--replicaof", "127.0.0.1", str(primary.port))
    values = {make_key("small"): chunk(0), make_key("mid"): chunk(1, MID)}
    _fill(f"{primary.url}?prefix=ro:", values)

    def replicated() -> bool:
        with replica.client() as c:
            return bool(c.exists(*(f"ro:{k.to_string()}" for k in values)) == len(values))

    assert wait_until(replicated)
    store = backend_for(f"{replica.url}?prefix=ro:")
    assert same(store.get(make_key("mid")), values[make_key("mid")])
    _refused_puts_leave_reads_alone(store, values)
    store.close()


def _hammer(store: LMCRemoteBackend, values: dict[Any, torch.Tensor], threads: int = 8, rounds: int = 6) -> list[str]:
    problems: list[str] = []
    keys = list(values)

    def work(t: int) -> None:
        for j in range(rounds):
            key = make_key(f"w{t}-{j}")
            value = chunk(100 * t + j, MID)
            try:
                store.put(key, value)
            except Exception as exc:  # noqa: BLE001 - the test reports it
                problems.append(f"put: {exc!r:.200}")
            if not same(store.get(key), value):
                problems.append("a miss of a chunk just put")
            got = store.batched_get(keys)
            problems.extend(["a batched miss"] * sum(not same(g, values[k]) for g, k in zip(got, keys, strict=True)))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "a worker hung"
    return problems


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_more_callers_than_max_connections_wait_for_one_instead_of_failing(redis_server, pipelined):
    """Defect: with ``max_connections`` (a redis-py option the connector passes on), redis-py's
    pool raises ``MaxConnectionsError`` (a ``ConnectionError``) at once when every connection
    is busy: with more threads than connections, puts failed, gets missed and the remote
    counted errors against a healthy server (8 threads over 2 connections: 82 failed puts,
    401 misses of 480 reads). Now a call waits up to the timeout for a connection."""
    prefix = f"mc{uuid.uuid4().hex[:6]}:"
    url = f"{redis_server.url}?max_connections=2&prefix={prefix}"
    values = {make_key(f"k{i}"): chunk(i, MID) for i in range(3)}
    _fill(url, values)
    store = backend_for(url, pipelined)
    assert store.get(make_key("k0")) is not None  # learns the size: inline gets and puts too
    problems = _hammer(store, values)
    assert not problems, problems[:5]
    assert store.stats["remote_errors"] == 0 and store.breaker.state == CLOSED
    store.close()


def test_a_cluster_with_max_connections_waits_for_a_connection_too(redis_cluster):
    """The same on a cluster, where the error also made redis-py re-read the topology."""
    prefix = f"mcc{uuid.uuid4().hex[:6]}:"
    url = f"{redis_cluster.url}?max_connections=1&prefix={prefix}"
    values = {make_key(f"k{i}"): chunk(i, MID) for i in range(3)}
    _fill(url, values)
    store = backend_for(url)
    problems = _hammer(store, values, threads=6, rounds=4)
    assert not problems, problems[:5]
    assert store.stats["remote_errors"] == 0 and store.breaker.state == CLOSED
    store.close()


def test_waiting_for_a_connection_ends_at_the_timeout_or_when_one_comes_free(redis_server):
    """The wait is bounded: with the only connection held, a call fails after about the
    timeout (never hangs); released meanwhile, the call goes on with it."""
    prefix = f"mcw{uuid.uuid4().hex[:6]}:"
    conn = RedisConnector(f"{redis_server.url}?max_connections=1&prefix={prefix}", timeout=1.0)
    key = make_key("held")
    conn.put(key, [b"value"])
    pool = conn._client().connection_pool
    held = pool.get_connection()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        conn.get(key)
    assert time.monotonic() - started < 5.0
    threading.Timer(0.2, pool.release, args=(held,)).start()
    assert conn.get(key) == b"value"
    conn.close()


def test_refusals_are_a_warning_once_a_minute_not_only_debug_lines(redis_server_private, caplog):
    """Refused gets are misses, never raised: with access denied (expired credentials, an
    ACL) a serving process logged them only at debug, and showed nothing but counters."""
    server = redis_server_private
    _fill(f"{server.url}?prefix=shut2:", {make_key("no"): chunk(1)})
    with server.client() as c:
        c.execute_command("ACL", "SETUSER", "outsider", "on", ">s3cret", "~open2:*", "+@all")
    store = backend_for(f"redis://outsider:s3cret@127.0.0.1:{server.port}/0?prefix=shut2:")
    try:
        with caplog.at_level(logging.DEBUG, logger="lmcache_core"):
            for _ in range(4):
                assert store.get(make_key("no")) is None
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        warned = [r for r in refused if r.levelno == logging.WARNING]
        assert len(warned) == 1 and len(refused) == 4, [(r.levelname, r.getMessage()) for r in refused]
        assert "NoPermission" in warned[0].getMessage() and "s3cret" not in caplog.text
    finally:
        store.close()
