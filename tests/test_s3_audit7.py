"""Regressions from the seventh look at the S3 path, each named after its defect.

1. An S3 GET had no bound of its own. The client's read timeout bounds each socket
   read, not the body, so a server or proxy that trickled a reply (each piece within
   the read timeout) held the GET, its backend I/O thread and its pooled connection
   until the last byte: a 4 MiB chunk sent 64 KiB every 0.25 s took 16 s at a 0.5 s
   timeout, long after the caller had given up. Single GETs, each GET of a batch and
   the ranged header GETs now end after ``GET_LIMIT_TIMEOUTS`` store timeouts.
2. An endpoint that is no S3 store (a web server or proxy that answers 200 to anything)
   took every PUT: each was acknowledged and lost, each read of it counted a corrupt
   chunk, and ``contains`` said yes. A PUT reply without the ETag every S3 store sends
   now fails the put, naming the endpoint as the thing to check.

Real components only: moto's S3 server, the loopback proxy, Python's own HTTP server.
"""

from __future__ import annotations

import http.server
import threading
import uuid
from typing import Any, Callable, Iterator

import pytest
import torch

from lmcache_core import chunk_format
from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.storage_backend.connector.fsspec_connector import GET_LIMIT_TIMEOUTS, FsspecConnector
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend
from tests.conftest import ends_within, make_key
from tests.servers_s3 import S3Server
from tests.tcp_proxy import TcpProxy

TIMEOUT = 0.5
# Generous for a loaded 2-core CI machine. Without the bound each trickled GET below
# takes about 16 s (4 MiB in 64 KiB pieces, one every 0.25 s).
ENDS_WITHIN = GET_LIMIT_TIMEOUTS * TIMEOUT + 5.0
SHAPE = (4, 2, 256, 8, 128)  # 4 MiB of fp16: a pooled body read piece by piece


def _encoded(key: Any, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return chunk_format.encode_bytes(torch.randn(SHAPE, generator=g).to(torch.float16), key.to_string())



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
    ended, result = ends_within(call, ENDS_WITHIN)
    assert ended, "a GET of a trickled reply ran past its limit"
    assert isinstance(result, TimeoutError) and "no answer within" in str(result), repr(result)


def test_a_get_of_a_trickled_reply_ends_at_its_limit_and_the_store_serves_after(
    conn: FsspecConnector, proxied: TcpProxy
) -> None:
    key = make_key("a7-get")
    conn.put(key, [_encoded(key, 1)])
    proxied.set_mode("trickle", delay=0.25, trickle_bytes=64 << 10)
    _assert_given_up(lambda: conn.get(key))
    proxied.set_mode("forward")
    assert bytes(conn.get(key) or b"") == _encoded(key, 1)


def test_each_get_of_a_batch_of_trickled_replies_ends_at_its_limit(conn: FsspecConnector, proxied: TcpProxy) -> None:
    keys = [make_key(f"a7-many-{i}") for i in range(3)]
    for i, key in enumerate(keys):
        conn.put(key, [_encoded(key, i)])
    proxied.set_mode("trickle", delay=0.25, trickle_bytes=64 << 10)
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


# -- 2. an endpoint that is no S3 store ------------------------------------------------


class _WebPageHandler(http.server.BaseHTTPRequestHandler):
    """A catch-all web server: 200 and a page for every request, whatever it was."""

    protocol_version = "HTTP/1.1"
    PAGE = b"<html><body>Welcome</body></html>"

    def log_message(self, *args: Any) -> None:
        pass

    def _page(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.PAGE)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.PAGE)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _page  # noqa: N815 - http.server names


@pytest.fixture
def web_page_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _WebPageHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_puts_to_an_endpoint_that_is_no_s3_store_fail(s3_server: S3Server, web_page_endpoint: str) -> None:
    options = {**s3_server.options, "endpoint_url": web_page_endpoint}
    conn = FsspecConnector("s3://bucket/p", timeout=TIMEOUT, **options)
    try:
        key, other = make_key("a7-web"), make_key("a7-web-2")
        with pytest.raises(OSError, match="no ETag"):
            conn.put(key, [_encoded(key, 0)[:4096]])
        with pytest.raises(OSError, match="no ETag"):
            conn.put_many([(key, [b"x" * 100]), (other, [b"y" * 100])])
    finally:
        conn.close()
    cfg = LMCacheEngineConfig(local_device=None, remote_url="s3://bucket/p", remote_timeout=TIMEOUT)
    store = LMCRemoteBackend(cfg, None, "cpu", **options)
    try:
        tensor = torch.randn(64)
        with pytest.raises(StoreUnavailableError, match="check endpoint_url"):
            store.put(make_key("a7-web-3"), tensor)
        assert store.stats["puts"] == 0
    finally:
        store.close()


def test_puts_to_moto_still_carry_their_etag(conn: FsspecConnector) -> None:
    key, other = make_key("a7-etag"), make_key("a7-etag-2")
    conn.put(key, [b"a" * 100])
    conn.put_many([(key, [b"b" * 100]), (other, [b"c" * 100])])
    assert [bytes(v or b"") for v in conn.get_many([key, other])] == [b"b" * 100, b"c" * 100]


# -- 3. botocore's names for credentials -------------------------------------------------


def test_credentials_under_botocores_names_in_the_url_work_and_stay_masked(s3_server: S3Server) -> None:
    """``?aws_access_key_id=..&aws_secret_access_key=..`` (the names botocore and the AWS
    CLI use) went to aiobotocore's session as they were: every call failed with
    "store unavailable: TypeError ... unexpected keyword argument"."""
    from urllib.parse import urlencode

    from lmcache_core.storage_backend import open_backend

    secret = "s3cr3t-" + uuid.uuid4().hex[:8]
    query = urlencode(
        {
            "endpoint_url": s3_server.endpoint_url,
            "aws_access_key_id": "AKIDEXAMPLE",
            "aws_secret_access_key": secret,
            "aws_session_token": "tok-" + secret,
            "region": "us-east-1",
        }
    )
    store = open_backend(f"{s3_server.url('a7-names')}?{query}", dst_device="cpu")
    try:
        key, value = make_key("a7-names"), torch.randn(64)
        store.put(key, value)
        got = store.get(key)
        assert got is not None and torch.equal(got, value)
        assert secret not in repr(store) and secret not in str(store.connector.display_url)
    finally:
        store.close()
