"""Regressions from the fifth audit of the S3 path, each named after its defect.

1. An S3 PUT had no bound of its own: aiohttp waits for the "100 Continue" that botocore
   asks for before a body with no timer at all (the socket read timeout starts only once
   the body is sent). A server that took a PUT's headers and went silent, or one that
   never sends "100 Continue" (an HTTP/1.0 server or proxy), held the PUT, its backend I/O
   thread and its pooled connection for good. The caller returned at its timeout, but
   after sixteen such puts every I/O thread was taken: each get and put after the server
   came back timed out, for ever.

Real components only: moto's S3 server, the loopback proxy, Python's own HTTP server.
"""

from __future__ import annotations

import http.server
import threading
import uuid
from typing import Any, Iterator

import pytest

from lmcache_core import chunk_format
from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.storage_backend.circuit import CircuitBreaker
from lmcache_core.storage_backend.connector.fsspec_connector import PUT_LIMIT_TIMEOUTS, FsspecConnector
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend, RetryPolicy
from tests.conftest import ends_within, make_key, wait_until
from tests.servers_s3 import S3Server
from tests.tcp_proxy import TcpProxy
from tests.test_conformance import chunk, same

TIMEOUT = 0.5
# A call that must end near its bound; generous for a loaded 2-core CI machine. Without
# the fix these calls never end at all.
ENDS_WITHIN = PUT_LIMIT_TIMEOUTS * TIMEOUT + 5.0


def _prefix() -> str:
    return f"a5-{uuid.uuid4().hex[:10]}"


def _encoded(key: Any, seed: int = 0) -> bytes:
    return chunk_format.encode_bytes(chunk(seed), key.to_string())



@pytest.fixture
def proxied(s3_server: S3Server) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", s3_server.port)) as proxy:
        yield proxy


# -- 1. a PUT to a server that went silent ------------------------------------------


def test_a_put_to_a_server_that_went_silent_ends_and_the_store_works_when_it_answers(
    s3_server: S3Server, proxied: TcpProxy
) -> None:
    options = {**s3_server.options, "endpoint_url": f"http://127.0.0.1:{proxied.port}"}
    conn = FsspecConnector(s3_server.url(_prefix()), timeout=TIMEOUT, **options)
    try:
        key, other, third = make_key("a5-put"), make_key("a5-put-many"), make_key("a5-put-many-2")
        conn.put(key, [_encoded(key)])  # the connection pool is warm
        proxied.set_mode("blackhole")  # takes the request, never answers
        for call in (
            lambda: conn.put(key, [_encoded(key, 1)]),
            lambda: conn.put_many([(other, [_encoded(other)]), (third, [_encoded(third)])]),
        ):
            ended, result = ends_within(call, ENDS_WITHIN)
            assert ended, "a PUT to a silent server never ended"
            assert isinstance(result, TimeoutError) and "no answer within" in str(result), repr(result)
        proxied.set_mode("forward")
        conn.put(other, [_encoded(other, 2)])
        assert bytes(conn.get(other) or b"") == _encoded(other, 2)
        assert bytes(conn.get(key) or b"") == _encoded(key)  # the PUT given up left the old object
        assert conn.get(third) is None
    finally:
        proxied.set_mode("forward")
        conn.close()


class _Http10Handler(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.0 server (as a mistyped endpoint or an old proxy may be): it never sends
    "100 Continue", it waits for the body a client holds back for one."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args: Any) -> None:
        pass

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)  # blocks: the client sends no body before "100 Continue"
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_put_to_an_endpoint_that_never_sends_100_continue_ends(s3_server: S3Server) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http10Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = {**s3_server.options, "endpoint_url": f"http://127.0.0.1:{server.server_port}"}
    conn = FsspecConnector("s3://bucket/p", timeout=TIMEOUT, **options)
    try:
        key = make_key("a5-http10")
        ended, result = ends_within(lambda: conn.put(key, [_encoded(key)]), ENDS_WITHIN)
        assert ended, "a PUT waiting for 100 Continue never ended"
        assert isinstance(result, TimeoutError), repr(result)
    finally:
        conn.close()
        server.shutdown()
        server.server_close()


def test_a_remote_blackholed_during_many_puts_works_again_when_the_server_answers(
    s3_server: S3Server, proxied: TcpProxy
) -> None:
    cfg = LMCacheEngineConfig(local_device=None, remote_url=s3_server.url(_prefix()), remote_timeout=TIMEOUT)
    store = LMCRemoteBackend(
        cfg,
        None,
        "cpu",
        retry=RetryPolicy(attempts=2, base_delay=0.02, max_delay=0.1),
        breaker=CircuitBreaker(failure_threshold=1000, reset_timeout=0.5),
        **{**s3_server.options, "endpoint_url": f"http://127.0.0.1:{proxied.port}"},
    )
    try:
        stored = make_key("a5-stored")
        store.put(stored, chunk(0))
        proxied.set_mode("blackhole")
        failed: list[BaseException] = []

        def put(i: int) -> None:
            try:
                store.put(make_key(f"a5-bh-{i}"), chunk(i))
            except StoreUnavailableError as exc:
                failed.append(exc)

        # More puts at once than the backend has I/O threads (16).
        threads = [threading.Thread(target=put, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ENDS_WITHIN)
        assert len(failed) == 24  # each caller returned at its timeout, as before
        proxied.set_mode("forward")
        # The sends given up free their threads and connections: the store serves again.
        assert wait_until(lambda: same(store.get(stored), chunk(0)), timeout=ENDS_WITHIN + 5)
        back = make_key("a5-after")
        assert wait_until(lambda: _put_ok(store, back, chunk(7)))
        assert same(store.get(back), chunk(7))
    finally:
        proxied.set_mode("forward")
        store.close()


def _put_ok(store: LMCRemoteBackend, key: Any, value: Any) -> bool:
    try:
        store.put(key, value)
    except StoreUnavailableError:
        return False
    return True
