"""Regressions from the seventh look at the S3 path, each named after its defect.

1. An S3 GET had no bound of its own. The client's read timeout bounds each socket
   read, not the body, so a server or proxy that trickled a reply (each piece within
   the read timeout) held the GET, its backend I/O thread and its pooled connection
   until the last byte: a 4 MiB chunk sent 64 KiB every 0.25 s took 16 s at a 0.5 s
   timeout, long after the caller had given up. Single GETs, each GET of a batch and
   the ranged header GETs now end after ``GET_LIMIT_TIMEOUTS`` store timeouts.

Real components only: moto's S3 server and the loopback proxy.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable, Iterator

import pytest
import torch

from lmcache_core import chunk_format
from lmcache_core.storage_backend.connector.fsspec_connector import GET_LIMIT_TIMEOUTS, FsspecConnector
from tests.conftest import make_key
from tests.servers_s3 import S3Server
from tests.tcp_proxy import TcpProxy

TIMEOUT = 0.5
# Generous for a loaded 2-core CI machine. Without the bound each trickled GET below
# takes about 16 s (4 MiB in 64 KiB pieces, one every 0.25 s).
ENDS_WITHIN = GET_LIMIT_TIMEOUTS * TIMEOUT + 5.0
TRICKLE = {"delay": 0.25, "trickle_bytes": 64 << 10}
SHAPE = (4, 2, 256, 8, 128)  # 4 MiB of fp16: a pooled body read piece by piece


def _encoded(key: Any, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return chunk_format.encode_bytes(torch.randn(SHAPE, generator=g).to(torch.float16), key.to_string())


def _in_thread(fn: Callable[[], Any], within: float) -> tuple[bool, Any]:
    """(whether ``fn`` ended within ``within`` seconds, its result or exception); a call
    that hangs is left on its daemon thread, so the test fails instead of hanging."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # returned, so the test asserts the type
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    return (not thread.is_alive(), out[0] if out else None)


@pytest.fixture
def proxied(s3_server: S3Server) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", s3_server.port)) as proxy:
        yield proxy


@pytest.fixture
def conn(s3_server: S3Server, proxied: TcpProxy) -> Iterator[FsspecConnector]:
    options = {**s3_server.options, "endpoint_url": f"http://127.0.0.1:{proxied.port}"}
    connector = FsspecConnector(s3_server.url(f"a7-{uuid.uuid4().hex[:10]}"), timeout=TIMEOUT, **options)
    try:
        yield connector
    finally:
        proxied.set_mode("forward")
        connector.close()


def _assert_given_up(call: Callable[[], Any]) -> None:
    ended, result = _in_thread(call, ENDS_WITHIN)
    assert ended, "a GET of a trickled reply ran past its limit"
    assert isinstance(result, TimeoutError) and "no answer within" in str(result), repr(result)


def test_a_get_of_a_trickled_reply_ends_at_its_limit_and_the_store_serves_after(
    conn: FsspecConnector, proxied: TcpProxy
) -> None:
    key = make_key("a7-get")
    conn.put(key, [_encoded(key, 1)])
    proxied.set_mode("trickle", **TRICKLE)
    _assert_given_up(lambda: conn.get(key))
    proxied.set_mode("forward")
    assert bytes(conn.get(key) or b"") == _encoded(key, 1)


def test_each_get_of_a_batch_of_trickled_replies_ends_at_its_limit(conn: FsspecConnector, proxied: TcpProxy) -> None:
    keys = [make_key(f"a7-many-{i}") for i in range(3)]
    for i, key in enumerate(keys):
        conn.put(key, [_encoded(key, i)])
    proxied.set_mode("trickle", **TRICKLE)
    _assert_given_up(lambda: conn.get_many(keys))
    proxied.set_mode("forward")
    got = conn.get_many(keys)
    assert [bytes(v or b"") for v in got] == [_encoded(k, i) for i, k in enumerate(keys)]


def test_a_header_get_of_a_trickled_reply_ends_at_its_limit(conn: FsspecConnector, proxied: TcpProxy) -> None:
    key = make_key("a7-head")
    conn.put(key, [_encoded(key, 2)])
    # One byte every 0.25 s: the 4 KiB header probe alone would take 17 minutes.
    proxied.set_mode("trickle", delay=0.25, trickle_bytes=1)
    _assert_given_up(lambda: conn.get_head(key, 4096))
    proxied.set_mode("forward")
    head = conn.get_head(key, 4096)
    assert head is not None and head[0] == _encoded(key, 2)[:4096] and head[1] == len(_encoded(key, 2))
