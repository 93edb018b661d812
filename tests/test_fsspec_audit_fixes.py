"""Regressions from the connector audit of the fsspec remote, each named after its defect.

1. A missing S3 bucket read as an empty store (s3fs raises ``FileNotFoundError`` for
   ``NoSuchBucket`` too): ``ls``/``stats``/``verify``/``lookup`` exited 0 with "0 chunks".
2. ``exists()`` on non-S3 stores used fsspec's ``isfile``, which answers False for any
   error: a refused connection read as "absent", and ``remove`` as "nothing to delete".
3. HTTP stores had aiohttp's 300 s timeout: each call to a dead server held an I/O
   thread for minutes after its caller gave up.
4. An S3 GET allocated and read the whole body before looking at the chunk header: a
   planted 1.5 GiB object of zeros cost 1.8 GiB of memory to be rejected.
6a. ``scheme_of`` put a URL without a scheme in its error unmasked.

Real components only: moto's S3 server, Python's own HTTP server, the loopback proxy.
"""

from __future__ import annotations

import functools
import http.server
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from typer.testing import CliRunner

from lmcache_cli.main import app
from lmcache_core import chunk_format
from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.storage_backend.circuit import CircuitBreaker
from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector
from lmcache_core.storage_backend.connector.registry import connector_for, scheme_of
from lmcache_core.storage_backend.remote_backend import (
    LMCPipelinedRemoteBackend,
    LMCRemoteBackend,
    RetryPolicy,
)
from tests.conftest import make_key
from tests.servers_s3 import S3Server
from tests.tcp_proxy import TcpProxy
from tests.test_conformance import chunk, same

TIMEOUT = 1.0
# A call that should end near its timeout; aiohttp's own default is 300 s. Generous,
# for a loaded CI machine: only "minutes" must fail.
ENDS_WITHIN = 30.0


def _remote(url: str, *, pipelined: bool = False, timeout: float = TIMEOUT, **options: Any) -> LMCRemoteBackend:
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=timeout)
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    return cls(
        cfg,
        None,
        "cpu",
        retry=RetryPolicy(attempts=2, base_delay=0.02, max_delay=0.1),
        breaker=CircuitBreaker(failure_threshold=50, reset_timeout=0.5),
        list_timeout=max(2.0, timeout),
        **options,
    )


def _encoded(key: Any, seed: int = 0, shape: tuple[int, ...] = (2, 2, 16, 2, 8)) -> bytes:
    return chunk_format.encode_bytes(chunk(seed, shape), key.to_string())


def _missing_bucket_url(s3_server: S3Server) -> str:
    return f"s3://no-such-bucket-{uuid.uuid4().hex[:10]}/p"


# -- 1. a missing bucket ------------------------------------------------------------


def test_a_missing_bucket_is_an_error_not_an_empty_store(s3_server: S3Server) -> None:
    key = make_key(1)
    missing = FsspecConnector(_missing_bucket_url(s3_server), timeout=TIMEOUT, **s3_server.options)
    try:
        for call in (
            lambda: list(missing.list()),
            lambda: list(missing.list_rank(key.fmt, key.model_name, key.world_size, key.worker_id)),
            lambda: missing.get(key),
            lambda: missing.get_many([key]),
            lambda: missing.get_head(key, 64),
            lambda: missing.exists(key),
            lambda: missing.delete(key),
        ):
            with pytest.raises(StoreUnavailableError, match="does not exist"):
                call()
    finally:
        missing.close()

    # A missing *object* in a bucket that exists stays a plain miss.
    there = FsspecConnector(s3_server.url(f"t-{uuid.uuid4().hex[:10]}"), timeout=TIMEOUT, **s3_server.options)
    try:
        assert list(there.list()) == []
        assert there.get(key) is None and there.get_many([key]) == [None]
        assert there.get_head(key, 64) is None
        assert there.exists(key) is False and there.delete(key) is False
        there.put(key, [_encoded(key)])
        assert there.exists(key) is True and [o.key for o in there.list()] == [key]
    finally:
        there.close()


def test_a_missing_bucket_counts_the_remote_unavailable(s3_server: S3Server) -> None:
    key = make_key(2)
    with _remote(_missing_bucket_url(s3_server), **s3_server.options) as store:
        with pytest.raises(StoreUnavailableError, match="does not exist"):
            store.list_info()
        assert store.get(key) is None and store.stats["unavailable"] == 1
        assert store.contains(key) is False and store.stats["unavailable"] == 2
        with pytest.raises(StoreUnavailableError):
            store.fetch_bytes(key)
        assert store.stats["corrupt"] == 0


@pytest.mark.usefixtures("private_cli_env")
def test_cli_commands_on_a_missing_bucket_fail_with_one_error_line(s3_server: S3Server, tmp_path: Path) -> None:
    url = f"{_missing_bucket_url(s3_server)}?endpoint_url={s3_server.endpoint_url}"
    prompt = tmp_path / "prompt.json"
    prompt.write_text("[" + ", ".join(str(i) for i in range(40)) + "]")
    key = make_key(3).to_string()
    for args in (
        ["ls"],
        ["stats"],
        ["verify"],
        ["lookup", "--tokens", str(prompt), "--model", "m"],
        ["get", key, "-o", str(tmp_path / "out.safetensors")],
    ):
        r = CliRunner().invoke(app, ["--store", url, *args])
        assert r.exit_code == 1, (args, r.stdout, r.stderr, r.exception)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
        assert "0 chunks" not in r.stdout and "cached prefix" not in r.stdout
    r = CliRunner().invoke(app, ["--store", url, "ls"])
    assert "does not exist" in r.stderr


# -- 2. exists() on a store that cannot answer ---------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_store(tmp_path: Path) -> Iterator[tuple[http.server.ThreadingHTTPServer, str]]:
    """A real HTTP server over ``tmp_path/www``, and the directory the store's chunks go in."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, str(root / "x")
    finally:
        server.shutdown()
        server.server_close()


def _write_chunk(directory: str, key: Any) -> None:
    writer = FsspecConnector(f"fsspec+file://{directory}", timeout=TIMEOUT)
    writer.put(key, [_encoded(key)])


def test_exists_on_a_store_that_refuses_raises_instead_of_reading_absent(
    http_store: tuple[http.server.ThreadingHTTPServer, str], tmp_path: Path
) -> None:
    server, directory = http_store
    # Plain model names: the HTTP server would decode the layout's "%2F" into a "/".
    present, absent = make_key(4, model="m"), make_key(5, model="m")
    _write_chunk(directory, present)
    url = f"fsspec+http://127.0.0.1:{server.server_address[1]}/x"
    connector = FsspecConnector(url, timeout=TIMEOUT)
    assert connector.exists(present) is True and connector.exists(absent) is False

    server.shutdown()
    server.server_close()  # connection refused from now on
    with pytest.raises(OSError, match="ClientConnectorError"):
        connector.exists(present)
    with pytest.raises(OSError):
        connector.delete(present)  # not "nothing to delete"

    with _remote(url) as store:
        assert store.contains(present) is False and store.stats["unavailable"] == 1
        with pytest.raises(StoreUnavailableError):
            store.remove(present)

    # What is there but is no object (a directory) is still absent.
    local = FsspecConnector(f"fsspec+file://{tmp_path / 's'}", timeout=TIMEOUT)
    local.put(present, [_encoded(present)])
    Path(local.path(absent)).mkdir(parents=True)
    assert local.exists(present) is True and local.exists(absent) is False


# -- 3. a timeout for HTTP clients -----------------------------------------------------


def _ends(fn: Any) -> tuple[bool, BaseException | None]:
    """Run ``fn`` on a daemon thread; (whether it ended within ENDS_WITHIN, what it raised)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(ENDS_WITHIN)
    return (not thread.is_alive(), outcome[0] if outcome else None)


def test_an_http_call_to_a_server_that_stopped_answering_ends_near_its_timeout(
    http_store: tuple[http.server.ThreadingHTTPServer, str],
) -> None:
    server, directory = http_store
    key = make_key(8, model="m")  # see above: a plain model name over HTTP
    _write_chunk(directory, key)
    with TcpProxy(("127.0.0.1", server.server_address[1])) as proxy:
        connector = FsspecConnector(f"fsspec+http://127.0.0.1:{proxy.port}/x", timeout=0.5)
        assert connector.get(key) == _encoded(key)
        proxy.set_mode("blackhole")  # pooled connections too: accepted, never answered
        for call in (lambda: connector.get(key), lambda: connector.exists(key)):
            ended, raised = _ends(call)
            assert ended, "an HTTP call to a silent server was still waiting (aiohttp's default is 300 s)"
            assert isinstance(raised, Exception), raised
        proxy.set_mode("forward")
        assert connector.get(key) == _encoded(key)


def test_http_clients_get_the_stores_timeout_unless_the_caller_set_one() -> None:
    import aiohttp

    for protocol in ("http", "https"):
        timeout = FsspecConnector._filesystem_options(protocol, {}, 0.5)["client_kwargs"]["timeout"]
        assert (timeout.sock_connect, timeout.sock_read) == (0.5, 0.5)
    mine = aiohttp.ClientTimeout(total=7)
    opts = FsspecConnector._filesystem_options("http", {"client_kwargs": {"timeout": mine, "trust_env": True}}, 0.5)
    assert opts["client_kwargs"] == {"timeout": mine, "trust_env": True}
    s3 = FsspecConnector._filesystem_options("s3", {}, 0.5)
    assert "timeout" not in s3.get("client_kwargs", {})  # S3: botocore's own timeouts, as before


# -- 4. a large S3 object that is no chunk ---------------------------------------------


def _plant(s3_server: S3Server, connector: FsspecConnector, key: Any, body: bytes) -> None:
    bucket, _, name = connector.path(key).partition("/")
    client = s3_server.client()
    try:
        client.put_object(Bucket=bucket, Key=name, Body=body)
    finally:
        client.close()


def test_a_large_s3_object_that_is_no_chunk_is_refused_before_its_body_is_read(s3_server: S3Server) -> None:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    zeros, padded, truncated, good = make_key(9), make_key(10), make_key(11), make_key(12)
    big = (2, 2, 256, 8, 64)  # 1 MiB of fp16: read through the pooled path
    connector = FsspecConnector(s3_server.url(prefix), timeout=5.0, **s3_server.options)
    try:
        _plant(s3_server, connector, zeros, bytes(16 * 2**20))
        _plant(s3_server, connector, padded, _encoded(padded, 1, big) + bytes(8 * 2**20))
        _plant(s3_server, connector, truncated, _encoded(truncated, 2, big)[: -(1 << 19)])
        _plant(s3_server, connector, good, _encoded(good, 3, big))
        # Only the header was read: not the 16 MiB (or 9 MiB, or 0.5 MiB) body.
        for key in (zeros, padded, truncated):
            value = connector.get(key)
            assert value is not None and len(value) <= 8 + chunk_format.MAX_HEADER_BYTES, (key, len(value or b""))
        batch = connector.get_many([zeros])
        assert len(batch) == 1 and len(batch[0] or b"") <= 8
    finally:
        connector.close()

    # Each is still a counted corrupt miss; a good chunk of the same size reads whole.
    for pipelined in (False, True):
        with _remote(s3_server.url(prefix), pipelined=pipelined, timeout=5.0, **s3_server.options) as store:
            assert store.get(zeros) is None and store.get(padded) is None and store.get(truncated) is None
            assert store.batched_get([zeros, good, padded])[0] is None
            assert same(store.get(good), chunk(3, big))
            got = store.batched_get([zeros, good, padded, truncated])
            assert got[0] is None and same(got[1], chunk(3, big)) and got[2] is None and got[3] is None
            assert store.stats["corrupt"] >= 6 and store.stats["unavailable"] == 0


# -- 6a. a URL without a scheme in the registry's error ---------------------------------


def test_a_url_without_a_scheme_is_refused_without_showing_its_password() -> None:
    for url in ("admin:SECRETPW@cache:6379/0", "redis//admin:SECRETPW@cache:6379/0"):
        with pytest.raises(ValueError) as err:
            connector_for(url, timeout=TIMEOUT)
        assert "SECRETPW" not in str(err.value) and "***" in str(err.value)
        with pytest.raises(ValueError) as err:
            scheme_of(url)
        assert "SECRETPW" not in str(err.value)
