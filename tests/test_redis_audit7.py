"""Regressions from the seventh look at the Redis path, each named after its defect.

1. A chunk longer than the server's ``proto-max-bulk-len`` read as an outage. The
   server answers such a ``SET`` by closing the connection mid-send: with a 1 MB limit
   (the smallest Redis takes) and 2 MiB chunks every put failed as "connection reset",
   was retried, struck the circuit and opened it, so gets of small chunks failed too,
   and the message never named the cause. Such a put is now refused before it is sent
   (the limit is asked once with ``CONFIG GET``), as a ``StoreFullError``: no retry, no
   strike.
2. Background puts a full or refusing store turned down logged one ERROR line each (one
   per chunk the engine stored); they are now logged as refusals, once a minute.
3. Reads on the backend's I/O threads (the first gets, every ``batched_get``'s MGET) were
   bounded per socket read only: a server or link that trickled a reply held the call and
   its thread until the last byte (a 4 MiB value sent 64 KiB every 0.25 s: 16 s at a
   0.5 s timeout; an MGET of two, 32 s). Every read of a large reply now ends by
   ``READ_LIMIT_TIMEOUTS`` store timeouts from the call's start.

Real components only: redis-server processes started by the suite, the loopback proxy.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import pytest
import redis
import torch

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreFullError, StoreUnavailableError
from lmcache_core.storage_backend.circuit import CLOSED, CircuitBreaker
from lmcache_core.storage_backend.connector.redis_connector import READ_LIMIT_TIMEOUTS, RedisConnector
from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
from tests.conftest import ends_within, make_key, wait_until
from tests.servers_redis import RedisCluster, RedisServer
from tests.tcp_proxy import TcpProxy

T = 1.0
SMALL = (2, 2, 16, 2, 8)  # 2 KiB of fp16
HALF_MB = (4, 2, 32, 8, 64)  # 512 KiB: under any server's limit
TWO_MB = (16, 2, 64, 8, 64)  # a plain SET
EIGHT_MB = (64, 2, 64, 8, 64)  # a staged put


def chunk(seed: int, shape: tuple[int, ...] = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.float16)


def backend_for(url: str, pipelined: bool = False) -> LMCRemoteBackend:
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    cfg = LMCacheEngineConfig(remote_url=url, remote_timeout=T)
    # Opens after 3 failures in a row, for 30 s: a strike too many would show.
    return cls(cfg, None, "cpu", breaker=CircuitBreaker(failure_threshold=3, reset_timeout=30, name="audit7"))


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_a_chunk_longer_than_the_servers_bulk_limit_is_refused_and_reads_go_on(
    redis_server_factory: Callable[..., RedisServer], pipelined: bool
) -> None:
    server = redis_server_factory("--proto-max-bulk-len", "1mb")
    store = backend_for(server.url, pipelined)
    try:
        small, fits = make_key("a7-small"), make_key("a7-fits")
        store.put(small, chunk(0))
        store.put(fits, chunk(1, HALF_MB))
        for i, shape in enumerate((TWO_MB, EIGHT_MB, TWO_MB)):
            with pytest.raises(StoreFullError, match="proto-max-bulk-len"):
                store.put(make_key(f"a7-big-{i}"), chunk(2, shape))
        for i in range(4):
            store.put_nonblocking(make_key(f"a7-nb-{i}"), chunk(3, TWO_MB))
        assert wait_until(lambda: store.stats["background_put_failures"] == 4)
        assert store.breaker.state == CLOSED
        assert store.stats["retries"] == 0
        assert torch.equal(store.get(small), chunk(0))
        assert torch.equal(store.get(fits), chunk(1, HALF_MB))
        assert store.get(make_key("a7-big-0")) is None
    finally:
        store.close()


def test_a_server_with_room_for_the_chunk_stores_it(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory("--proto-max-bulk-len", "16mb")
    store = backend_for(server.url)
    try:
        for i, shape in enumerate((TWO_MB, EIGHT_MB)):
            key = make_key(f"a7-room-{i}")
            store.put(key, chunk(i, shape))
            assert torch.equal(store.get(key), chunk(i, shape))
    finally:
        store.close()


def test_a_user_who_may_not_read_the_config_still_puts(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "writer", "on", ">pw", "~*", "+@all", "-config")
    admin.close()
    url = f"redis://writer:pw@127.0.0.1:{server.port}/0"
    conn = RedisConnector(url, timeout=T)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            conn._client().config_get("proto-max-bulk-len")  # the user really is denied
    finally:
        conn.close()
    store = backend_for(url)
    try:
        key = make_key("a7-acl")
        store.put(key, chunk(5, TWO_MB))
        assert torch.equal(store.get(key), chunk(5, TWO_MB))
    finally:
        store.close()


def test_each_node_of_a_cluster_is_asked_its_limit(redis_cluster: RedisCluster) -> None:
    """One node answered for all: keys on a node with a lower limit got the outage back."""
    nodes = [redis.Redis(port=p) for p in redis_cluster.ports]
    before = [n.config_get("proto-max-bulk-len")["proto-max-bulk-len"] for n in nodes]
    conn = RedisConnector(redis_cluster.url, timeout=T)
    try:
        for n in nodes[1:]:
            n.config_set("proto-max-bulk-len", "1mb")
        assert conn._ask_bulk_limit() == 1024 * 1024
        with pytest.raises(StoreFullError, match="proto-max-bulk-len"):
            conn.put(make_key("a7-cluster-big"), [bytes(2 << 20)])
    finally:
        conn.close()
        for n, value in zip(nodes, before, strict=True):
            n.config_set("proto-max-bulk-len", value)
            n.close()


def test_refused_background_puts_are_logged_once_not_once_each(
    redis_server_factory: Callable[..., RedisServer], caplog: Any
) -> None:
    server = redis_server_factory("--proto-max-bulk-len", "1mb")
    store = backend_for(server.url)
    try:
        with caplog.at_level(logging.DEBUG, logger="lmcache_core"):
            for i in range(6):
                store.put_nonblocking(make_key(f"a7-log-{i}"), chunk(i, TWO_MB))
            assert wait_until(lambda: store.stats["background_put_failures"] == 6)
            time.sleep(0.05)  # the last failure's log line follows its count
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) == 1, [r.getMessage() for r in loud]
        assert "proto-max-bulk-len" in loud[0].getMessage() and "once a minute" in loud[0].getMessage()
    finally:
        store.close()


# -- 3. a trickled reply on an I/O thread ----------------------------------------------



def test_reads_of_a_trickled_reply_end_at_their_limit(redis_server: RedisServer) -> None:
    timeout = 0.5
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        conn = RedisConnector(f"redis://127.0.0.1:{proxy.port}/0", timeout=timeout, prefix="a7-trickle:")
        try:
            keys = [make_key("a7-trickle-0"), make_key("a7-trickle-1")]
            values = [bytes([i]) * (4 << 20) for i in range(2)]
            for key, value in zip(keys, values, strict=True):
                conn.put(key, [value])
            # Each call takes 16-32 s without the bound; generous for a loaded CI machine.
            within = READ_LIMIT_TIMEOUTS * timeout + 5.0
            for call in (lambda: conn.get(keys[0]), lambda: conn.get_many(keys)):
                proxy.set_mode("trickle", delay=0.25, trickle_bytes=64 << 10)
                ended, result = ends_within(call, within)
                proxy.set_mode("forward")
                assert ended, "a read of a trickled reply ran past its limit"
                assert isinstance(result, StoreUnavailableError) and "Timeout" in str(result), repr(result)
            assert [bytes(v or b"") for v in conn.get_many(keys)] == values
            assert bytes(conn.get(keys[1]) or b"") == values[1]
        finally:
            proxy.set_mode("forward")
            conn.close()


# -- 4. a wrong password ----------------------------------------------------------------


def test_a_wrong_password_is_an_answer_that_names_the_credentials(redis_server_factory: Callable[..., RedisServer]) -> None:
    """A wrong or missing password read as an outage: each call was retried, the circuit
    opened, and the CLI said to check that the server is up."""
    import subprocess
    import sys
    from pathlib import Path

    from lmcache_core.errors import StoreDeniedError

    server = redis_server_factory("--requirepass", "right-pw")
    for url in (f"redis://:wrong-pw@127.0.0.1:{server.port}/0", server.url):
        store = backend_for(url)
        try:
            with pytest.raises(StoreDeniedError, match="authentication failed"):
                store.put(make_key("a7-auth"), chunk(1))
            assert store.get(make_key("a7-auth")) is None
            assert store.breaker.state == CLOSED and store.stats["retries"] == 0
        finally:
            store.close()
    lmcache = str(Path(sys.executable).with_name("lmcache"))
    proc = subprocess.run(
        [lmcache, "--store", f"redis://:wrong-pw@127.0.0.1:{server.port}/0", "ls"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.splitlines()[-1]  # after the store's own warning of the refusal
    assert last.startswith("error: access denied:") and "check the credentials" in last, proc.stderr
    assert "wrong-pw" not in proc.stderr
    # Refused calls fail at once for a while: they do not connect to be refused again
    # (a wrong password made two connections per get, 400 for 200 gets).
    admin = redis.Redis(port=server.port, password="right-pw")
    wrong = backend_for(f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
    try:
        before = admin.info("stats")["total_connections_received"]
        for i in range(100):
            assert wrong.get(make_key(f"a7-auth-{i}")) is None
        assert admin.info("stats")["total_connections_received"] - before <= 3
    finally:
        wrong.close()
        admin.close()
    right = backend_for(f"redis://:right-pw@127.0.0.1:{server.port}/0")
    try:
        right.put(make_key("a7-auth"), chunk(1))
        assert torch.equal(right.get(make_key("a7-auth")), chunk(1))
    finally:
        right.close()


# -- 5. an option redis-py does not take ---------------------------------------------------


def test_an_unknown_redis_option_is_refused_when_the_store_is_opened(redis_server: RedisServer) -> None:
    """``?timeout=0.5`` opened fine, then every call failed as "store unavailable:
    TypeError ... unexpected keyword argument 'timeout'", a strike against the circuit each."""
    with pytest.raises(ValueError, match=r"unknown option 'timeout' \(did you mean 'socket_timeout'\?\)"):
        RedisConnector(f"{redis_server.url}?timeout=0.5", timeout=T)
    with pytest.raises(ValueError, match="TLS options need a rediss:// URL"):
        RedisConnector(redis_server.url, timeout=T, ssl_ca_certs="/nonexistent/ca.pem")
    # Options redis-py does take (and lmcache's own) still open and work.
    conn = RedisConnector(
        f"{redis_server.url}?socket_keepalive=true&health_check_interval=5&prefix=a7-opt:&staged_puts=false",
        timeout=T,
        max_connections=8,
        client_name="mine",
    )
    try:
        key = make_key("a7-opt")
        conn.put(key, [b"v" * 10])
        assert bytes(conn.get(key) or b"") == b"v" * 10
    finally:
        conn.close()
