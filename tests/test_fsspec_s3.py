"""The S3 remote tier against a real S3 endpoint (moto's server): layout, options,
hostile objects, and faults (server stopped, restarted, blackholed, resetting).

Fault tests use their own server (``s3_server_private``) or a TCP proxy in
front of the shared one, so the shared server always stays up.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest
import torch

from lmcache_core import chunk_format, layout
from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.storage_backend import open_backend
from lmcache_core.storage_backend.circuit import CircuitBreaker
from lmcache_core.storage_backend.connector import s3_checksum
from lmcache_core.storage_backend.remote_backend import (
    LMCPipelinedRemoteBackend,
    LMCRemoteBackend,
    RetryPolicy,
)
from tests.conftest import make_key, wait_until
from tests.servers_s3 import S3Server
from tests.tcp_proxy import TcpProxy
from tests.test_conformance import chunk, same

TIMEOUT = 0.5
# "returns within its timeout": the hard bound is TIMEOUT; the rest is slack for a
# loaded 2-core CI machine where the caller's thread may wait for a core.
BOUND = max(TIMEOUT * 3, 2.0)


def _prefix(request: pytest.FixtureRequest) -> str:
    import hashlib

    return "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]


def _backend(
    server: S3Server,
    prefix: str,
    *,
    endpoint_url: str | None = None,
    pipelined: bool = False,
    timeout: float = TIMEOUT,
    breaker: CircuitBreaker | None = None,
    **more: Any,
) -> LMCRemoteBackend:
    options = {**server.options, **more}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    cfg = LMCacheEngineConfig(local_device=None, remote_url=server.url(prefix), remote_timeout=timeout)
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    return cls(
        cfg,
        None,
        "cpu",
        retry=RetryPolicy(attempts=2, base_delay=0.02, max_delay=0.1),
        breaker=breaker or CircuitBreaker(failure_threshold=3, reset_timeout=0.5),
        list_timeout=max(1.0, timeout),
        **options,
    )


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    try:
        result: Any = fn()
    except Exception as exc:  # returned, so the caller asserts the type
        result = exc
    return result, time.monotonic() - start


def _seed(store: LMCRemoteBackend, key: Any, value: torch.Tensor) -> None:
    """Setup put: a loaded CI machine may miss the short test timeout once; not what is tested."""
    for _ in range(4):
        try:
            store.put(key, value)
            return
        except StoreUnavailableError:
            time.sleep(0.6)  # past the breaker's cooldown
    store.put(key, value)


# -- layout, options, opening -------------------------------------------------------


def test_objects_follow_the_store_layout(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    prefix = _prefix(request)
    key, value = make_key(1, model="org/Model-7B"), chunk(1)
    with _backend(s3_server, prefix) as store:
        store.put(key, value)
    client = s3_server.client()
    try:
        listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix + "/")
        names = [o["Key"] for o in listed.get("Contents", [])]
        assert names == [f"{prefix}/{layout.key_to_path(key)}"]
        body = client.get_object(Bucket=s3_server.bucket, Key=names[0])["Body"].read()
    finally:
        client.close()
    # a plain safetensors file any tool can read, holding exactly the tensor
    from safetensors.torch import load

    loaded = load(body)
    assert list(loaded) == [chunk_format.TENSOR_NAME]
    assert same(loaded[chunk_format.TENSOR_NAME], value)


def test_open_backend_s3_url_with_options(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    url = s3_server.url(_prefix(request))
    with open_backend(url, remote_timeout=5, **s3_server.options) as store:
        assert isinstance(store, LMCRemoteBackend) and not isinstance(store, LMCPipelinedRemoteBackend)
        store.put(make_key(1), chunk(1))
    with open_backend(url, pipelined=True, **s3_server.options) as store:
        assert isinstance(store, LMCPipelinedRemoteBackend)
        assert same(store.batched_get([make_key(1)])[0], chunk(1))
    # s3a:// is the same store
    with open_backend(url.replace("s3://", "s3a://"), **s3_server.options) as store:
        assert same(store.get(make_key(1)), chunk(1))


def test_endpoint_and_credentials_in_the_url_are_masked(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    opts = s3_server.options
    url = (
        f"{s3_server.url(_prefix(request))}?endpoint_url={opts['endpoint_url']}"
        f"&key={opts['key']}&secret={opts['secret']}&region=us-east-1"
    )
    with open_backend(url) as store:
        store.put(make_key(2), chunk(2))
        assert same(store.get(make_key(2)), chunk(2))
        text = store.describe()
        assert opts["secret"] not in text and opts["key"] not in text and "***" in text


def test_credentials_from_the_environment(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    # Only the endpoint is given; key and secret come from AWS_* variables,
    # as they would from a profile or an instance role in production.
    with open_backend(s3_server.url(_prefix(request)), endpoint_url=s3_server.endpoint_url) as store:
        store.put(make_key(3), chunk(3))
        assert same(store.get(make_key(3)), chunk(3))


def test_a_bucket_is_required() -> None:
    with pytest.raises(ValueError, match="bucket"):
        LMCRemoteBackend(LMCacheEngineConfig(local_device=None, remote_url="s3://"), None, "cpu")


# -- hostile objects -----------------------------------------------------------------


def test_foreign_and_corrupt_objects_on_s3(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    prefix = _prefix(request)
    good, corrupt = make_key("good"), make_key("corrupt")
    client = s3_server.client()
    store = _backend(s3_server, prefix, pipelined=True)
    try:
        store.put(good, chunk(1))
        for name, body in (
            (f"{prefix}/README.md", b"hello"),
            (f"{prefix}/vllm/x.safetensors", b"x"),
            (f"{prefix}/{layout.key_to_path(corrupt)}", b"\x00" * 64),
            (f"{prefix}-sibling/{layout.key_to_path(good)}", b"other prefix"),
        ):
            client.put_object(Bucket=s3_server.bucket, Key=name, Body=body)
        assert set(store.list()) == {good, corrupt}  # names only; bytes never trusted
        assert store.get(corrupt) is None
        assert store.batched_get([corrupt, good])[0] is None
        assert store.read_header(corrupt) is None
        assert store.stats["corrupt"] == 2
        infos = {i.key: i for i in store.list_info()}
        assert infos[good].size == len(chunk_format.encode_bytes(chunk(1), good.to_string()))
        mtime = infos[good].mtime
        assert mtime is not None and abs(mtime - time.time()) < 300
    finally:
        store.close()
        client.close()


def test_regression_empty_object_get_opened_the_circuit_breaker(
    s3_server: S3Server, request: pytest.FixtureRequest
) -> None:
    """A 0-byte object answers a from-byte-0 GET (``read_header``'s range read) with
    InvalidRange (416): that is a corrupt chunk on a healthy server, not an outage, so
    the circuit must stay closed."""
    prefix = _prefix(request)
    key = make_key("empty")
    client = s3_server.client()
    try:
        client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{layout.key_to_path(key)}", Body=b"")
    finally:
        client.close()
    for pipelined in (False, True):
        store = _backend(s3_server, prefix, pipelined=pipelined)
        try:
            for _ in range(5):
                assert store.get(key) is None
                assert store.batched_get([key]) == [None]
            assert store.read_header(key) is None
            assert store.breaker.state == "closed"
            assert store.stats["remote_errors"] == 0 and store.stats["corrupt"] == 10
        finally:
            store.close()


@pytest.mark.parametrize("mib", [2, 9])
def test_small_bodies_are_joined_and_large_ones_sent_from_the_tensor(
    s3_server: S3Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, mib: int
) -> None:
    """Both ways of sending a chunk store it whole (2 MiB: one joined bytes; 9 MiB: the
    header and the tensor's own memory through PartsReader, no join)."""
    from lmcache_core.storage_backend.connector.fsspec_connector import PartsReader

    key = make_key(f"body-{mib}")
    value = torch.randn(mib * 2**20 // 2, generator=torch.Generator().manual_seed(mib)).to(torch.bfloat16)
    store = _backend(s3_server, _prefix(request), timeout=10.0)
    try:
        bodies: list[type] = []
        real = store.connector.fs.pipe_file

        def spy(path: str, data: Any, **kwargs: Any) -> Any:
            bodies.append(type(data))
            return real(path, data, **kwargs)

        monkeypatch.setattr(store.connector.fs, "pipe_file", spy)  # fsspec shares the instance
        store.put(key, value)
        assert bodies == [bytes if mib < 8 else PartsReader]
        assert same(store.get(key), value)
    finally:
        store.close()


def test_read_header_on_s3_reads_a_range(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    key = make_key("hdr")
    value = torch.zeros((4, 2, 256, 8, 32), dtype=torch.bfloat16)  # 1 MiB
    store = _backend(s3_server, _prefix(request), timeout=5.0)
    try:
        store.put(key, value)
        fetched: list[int] = []
        real = store.connector.get_head

        def spy(k: Any, nbytes: int) -> tuple[bytes, int] | None:
            got = real(k, nbytes)
            fetched.append(len(got[0]) if got else 0)
            return got

        store.connector.get_head = spy  # type: ignore[method-assign]
        header = store.read_header(key)
        assert header is not None and header.shape == tuple(value.shape) and header.dtype == "BF16"
        assert sum(fetched) <= 4096
        assert real(key, 16)[1] == header.total_size  # the size, from the same ranged GET
    finally:
        store.close()


def test_get_head_on_s3_sizes_short_empty_and_absent_objects(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    store = _backend(s3_server, _prefix(request), timeout=5.0)
    try:
        conn = store.connector
        conn.put(make_key("short"), [b"0123456789"])
        conn.put(make_key("empty"), [b""])
        assert conn.get_head(make_key("short"), 4) == (b"0123", 10)
        assert conn.get_head(make_key("short"), 4096) == (b"0123456789", 10)  # range past the end
        assert conn.get_head(make_key("empty"), 4096) == (b"", 0)  # S3: InvalidRange, not an outage
        assert conn.get_head(make_key("absent"), 4096) is None
        assert store.stats["unavailable"] == 0
    finally:
        store.close()


# -- faults ----------------------------------------------------------------------------


def test_a_500_from_s3_on_put_is_retried_and_the_chunk_stored(
    s3_server: S3Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 asks clients to retry a 500 (moto answers one when a PUT races a DELETE of the
    same key); a put fails only when every attempt does."""
    import moto.s3.models

    real = moto.s3.models.S3Backend.put_object
    prefix = _prefix(request)
    failures = {"left": 0, "served": 0}

    def flaky(self: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        if key_name.startswith(prefix + "/") and failures["left"] > 0:
            failures["left"] -= 1
            failures["served"] += 1
            raise RuntimeError("injected: the server failed this PUT")  # werkzeug answers 500
        return real(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(moto.s3.models.S3Backend, "put_object", flaky)
    # A retry starts only if a try as slow as the failed one still fits before the deadline:
    # with the usual 0.5 s, a 500 that took moto 0.25 s on a loaded machine was not retried.
    with _backend(s3_server, prefix, timeout=5.0) as store:  # two attempts per call
        failures["left"] = 1
        store.put(make_key("once"), chunk(1))
        assert failures["served"] == 1 and store.stats["retries"] == 1
        assert same(store.get(make_key("once")), chunk(1))
        failures["left"] = 1
        store.put(make_key("queued"), chunk(2), blocking=False)
        assert wait_until(lambda: store.stats["puts"] == 2)
        assert same(store.get(make_key("queued")), chunk(2))
        failures["left"] = 2
        with pytest.raises(StoreUnavailableError):
            store.put(make_key("twice"), chunk(3))
        assert failures["served"] == 4 and store.get(make_key("twice")) is None
        assert store.stats["background_put_failures"] == 0 and store.stats["put_failures"] == 1


def test_stopped_server_then_restarted(s3_server_private: S3Server, request: pytest.FixtureRequest) -> None:
    server = s3_server_private
    key = make_key("alive")
    with _backend(server, _prefix(request)) as store:
        _seed(store, key, chunk(1))
        server.stop()
        got, elapsed = _timed(lambda: store.get(key))
        assert got is None and elapsed < BOUND, (got, elapsed)
        result, elapsed = _timed(lambda: store.put(make_key("down"), chunk(2)))
        assert isinstance(result, StoreUnavailableError) and elapsed < BOUND, (result, elapsed)
        found, elapsed = _timed(lambda: store.contains(make_key("unknown")))
        assert found is False and elapsed < BOUND, (found, elapsed)
        result, elapsed = _timed(lambda: store.put(make_key("queued"), chunk(3), blocking=False))
        assert result is None and elapsed < 0.5  # non-blocking: returns at once
        assert wait_until(lambda: store.stats["background_put_failures"] == 1)
        assert store.stats["misses"] >= 1
        # The server comes back: the same backend object recovers by itself.
        server.start()
        assert wait_until(lambda: same(store.get(key), chunk(1)))
        store.put(make_key("after"), chunk(4))
        assert same(store.get(make_key("after")), chunk(4))


@pytest.fixture
def proxied(s3_server: S3Server) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", s3_server.port)) as proxy:
        yield proxy


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_blackholed_server_every_call_returns_within_its_timeout(
    s3_server: S3Server, proxied: TcpProxy, request: pytest.FixtureRequest, pipelined: bool
) -> None:
    endpoint = f"http://127.0.0.1:{proxied.port}"
    # A high threshold keeps the breaker closed, so each call really waits on the network.
    store = _backend(
        s3_server,
        _prefix(request),
        endpoint_url=endpoint,
        pipelined=pipelined,
        breaker=CircuitBreaker(failure_threshold=1000, reset_timeout=0.5),
    )
    try:
        keys = [make_key(f"bh{i}") for i in range(3)]
        for i, k in enumerate(keys):
            _seed(store, k, chunk(i))
        proxied.set_mode("blackhole")  # accepts, reads, never answers
        for op, expected in (
            (lambda: store.get(keys[0]), None),
            (lambda: store.contains(make_key("unknown")), False),
            (lambda: store.batched_get(keys), [None, None, None]),
            (lambda: store.read_header(keys[0]), None),
        ):
            result, elapsed = _timed(op)
            assert result == expected and elapsed < BOUND, (result, elapsed)
        result, elapsed = _timed(lambda: store.put(make_key("p"), chunk(9)))
        assert isinstance(result, StoreUnavailableError) and elapsed < BOUND, (result, elapsed)
        result, elapsed = _timed(lambda: store.list())
        assert isinstance(result, StoreUnavailableError) and elapsed < store.list_timeout + 1
        assert store.stats["timeouts"] >= 4
        proxied.set_mode("forward")
        assert wait_until(lambda: same(store.get(keys[1]), chunk(1)))
    finally:
        proxied.set_mode("forward")
        store.close()


def test_breaker_fails_fast_on_a_blackholed_server_and_probes_again(
    s3_server: S3Server, proxied: TcpProxy, request: pytest.FixtureRequest
) -> None:
    store = _backend(
        s3_server,
        _prefix(request),
        endpoint_url=f"http://127.0.0.1:{proxied.port}",
        breaker=CircuitBreaker(failure_threshold=2, reset_timeout=0.5),
    )
    try:
        key = make_key("cb")
        _seed(store, key, chunk(1))
        proxied.set_mode("blackhole")
        for _ in range(2):
            store.get(key)
        assert store.breaker.state == "open"
        got, elapsed = _timed(lambda: store.get(key))
        assert got is None and elapsed < 0.1  # failed fast, no network wait
        result, elapsed = _timed(lambda: store.put(make_key("x"), chunk(2)))
        assert isinstance(result, StoreUnavailableError) and elapsed < 0.1
        proxied.set_mode("forward")
        assert wait_until(lambda: store.get(key) is not None)
        assert store.breaker.state == "closed"
    finally:
        proxied.set_mode("forward")
        store.close()


def test_reset_connections_are_misses_and_failures(
    s3_server: S3Server, proxied: TcpProxy, request: pytest.FixtureRequest
) -> None:
    store = _backend(s3_server, _prefix(request), endpoint_url=f"http://127.0.0.1:{proxied.port}")
    try:
        key = make_key("rst")
        _seed(store, key, chunk(1))
        proxied.set_mode("reset")
        got, elapsed = _timed(lambda: store.get(key))
        assert got is None and elapsed < BOUND, (got, elapsed)
        result, elapsed = _timed(lambda: store.put(make_key("y"), chunk(2)))
        assert isinstance(result, StoreUnavailableError) and elapsed < BOUND, (result, elapsed)
        proxied.set_mode("forward")
        assert wait_until(lambda: same(store.get(key), chunk(1)))
    finally:
        proxied.set_mode("forward")
        store.close()


def test_slow_server_within_the_timeout_still_works(
    s3_server: S3Server, proxied: TcpProxy, request: pytest.FixtureRequest
) -> None:
    store = _backend(s3_server, _prefix(request), endpoint_url=f"http://127.0.0.1:{proxied.port}", timeout=1.0)
    try:
        key = make_key("slow")
        _seed(store, key, chunk(1))
        proxied.set_mode("delay", delay=0.1)
        assert same(store.get(key), chunk(1))
        proxied.set_mode("delay", delay=3.0)  # slower than the timeout
        got, elapsed = _timed(lambda: store.get(key))
        assert got is None and elapsed < 1.0 * 3, (got, elapsed)
    finally:
        proxied.set_mode("forward")
        store.close()


def test_close_is_bounded_with_queued_writes_to_a_blackholed_server(
    s3_server: S3Server, proxied: TcpProxy, request: pytest.FixtureRequest
) -> None:
    store = _backend(
        s3_server,
        _prefix(request),
        endpoint_url=f"http://127.0.0.1:{proxied.port}",
        breaker=CircuitBreaker(failure_threshold=2, reset_timeout=30.0),
    )
    proxied.set_mode("blackhole")
    try:
        for i in range(10):
            store.put(make_key(f"q{i}"), chunk(i), blocking=False)
        _, elapsed = _timed(store.close)
        # two writes (one per writer thread) time out, then the breaker fails the rest fast
        assert elapsed < TIMEOUT * 2 + 2.0
        assert store.stats["background_put_failures"] == 10
    finally:
        proxied.set_mode("forward")
        store.close()


def test_pipelined_concurrent_callers_on_s3(s3_server: S3Server, request: pytest.FixtureRequest) -> None:
    import random
    import threading

    with _backend(s3_server, _prefix(request), pipelined=True, timeout=5.0) as store:
        stored = {make_key(f"c{i}"): chunk(i) for i in range(8)}
        store.batched_put(list(stored.items()))
        absent = [make_key(f"none{i}") for i in range(4)]
        errors: list[BaseException] = []

        def caller(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(3):
                    keys = list(stored) + absent
                    rng.shuffle(keys)
                    got = store.batched_get(keys)
                    for k, g in zip(keys, got, strict=True):
                        assert same(g, stored[k]) if k in stored else g is None
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_get_many_bounds_bytes_in_flight_by_the_sizes_it_reads(
    s3_server: S3Server, request: pytest.FixtureRequest
) -> None:
    """Large objects go a few GETs at a time; small ones all at once (and results stay aligned)."""
    import asyncio

    from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector

    conn = FsspecConnector(s3_server.url(_prefix(request)), timeout=5.0, **s3_server.options)
    conn.batch_budget_bytes = 8000
    big = {make_key(f"b{i}"): b"B%03d" % i * 500 for i in range(8)}  # 2000 bytes: four in flight
    small = {make_key(f"s{i}"): b"s%03d" % i * 25 for i in range(8)}  # 100 bytes: all eight
    conn.put_many([(k, [v]) for k, v in {**big, **small}.items()])
    fs = conn.fs
    real = fs._call_s3
    state = {"now": 0, "peak": 0}

    async def counting(method: str, *args: Any, **kwargs: Any) -> Any:
        if method != "get_object":
            return await real(method, *args, **kwargs)
        state["now"] += 1  # one event loop: no lock needed
        state["peak"] = max(state["peak"], state["now"])
        try:
            await asyncio.sleep(0.02)  # keep each GET open long enough to overlap the others
            return await real(method, *args, **kwargs)
        finally:
            state["now"] -= 1

    fs._call_s3 = counting
    try:
        assert conn.get(next(iter(big))) == next(iter(big.values()))  # learns: 2000-byte objects
        keys = list(big)[:3] + [make_key("absent")] + list(big)[3:]
        got = conn.get_many(keys)
        assert got[3] is None
        assert [g for g in got if g is not None] == list(big.values())
        assert state["peak"] == 4
        assert conn.get(next(iter(small))) == next(iter(small.values()))  # now 100-byte objects
        state["peak"] = 0
        assert conn.get_many(list(small)) == list(small.values())
        assert state["peak"] == 8
    finally:
        del fs._call_s3
        conn.close()


BIG = (4, 2, 64, 8, 64)  # 512 KiB in float16: above POOLED_BODY_BYTES


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_large_bodies_land_in_reused_pooled_buffers(
    s3_server: S3Server, request: pytest.FixtureRequest, pipelined: bool
) -> None:
    from lmcache_core.storage_backend.connector.fsspec_connector import POOLED_BODY_BYTES
    from lmcache_core.storage_backend.mem_pool import shared_pool

    keys = [make_key(f"big{i}") for i in range(3)]
    values = [chunk(i, BIG) for i in range(3)]
    assert values[0].numel() * values[0].element_size() >= POOLED_BODY_BYTES
    store = _backend(s3_server, _prefix(request), pipelined=pipelined, timeout=5.0)
    try:
        for k, v in zip(keys, values, strict=True):
            store.put(k, v)
        raw = store.connector.get(keys[0])
        assert isinstance(raw, memoryview) and not raw.readonly  # a pooled buffer, not a fresh bytes
        del raw
        pool = shared_pool("s3-bodies", 1)  # the connector's pool (already made; the size is ignored)
        held = store.batched_get(keys)  # three buffers busy at once
        assert all(same(h, v) for h, v in zip(held, values, strict=True))
        retained = pool.stats()["retained_bytes"]
        assert retained >= 3 * values[0].numel() * values[0].element_size()
        del held
        for _ in range(5):  # dropped tensors free their buffers: nothing new is allocated
            got = store.get(keys[1])
            assert same(got, values[1])
            del got
            assert store.batched_get(keys[:2])[1] is not None
        assert pool.stats()["retained_bytes"] == retained
    finally:
        store.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_a_body_cut_short_is_a_failed_read_not_a_short_chunk(
    s3_server: S3Server, proxied: TcpProxy, request: pytest.FixtureRequest, pipelined: bool
) -> None:
    store = _backend(
        s3_server, _prefix(request), endpoint_url=f"http://127.0.0.1:{proxied.port}", pipelined=pipelined
    )
    key = make_key("cut")
    try:
        _seed(store, key, chunk(5, BIG))
        proxied.set_mode("truncate", cut_after=256 * 1024)  # headers and the first ~256 KiB only
        before = store.stats["remote_errors"]
        got, elapsed = _timed(lambda: store.batched_get([key])[0] if pipelined else store.get(key))
        assert got is None and elapsed < BOUND, (got, elapsed)
        assert store.stats["remote_errors"] > before  # a transport failure...
        assert store.stats["corrupt"] == 0  # ...not bytes taken for a bad chunk
        proxied.set_mode("forward")
        assert wait_until(lambda: same(store.get(key), chunk(5, BIG)))
    finally:
        proxied.set_mode("forward")
        store.close()


SMALL = (2, 2, 16, 8, 32)  # 64 KiB in float16: read whole, below POOLED_BODY_BYTES


@pytest.mark.parametrize(
    ("shape", "checker", "pipelined"),
    [
        (BIG, "ours", False),
        (BIG, "ours", True),
        (SMALL, "ours", False),
        (BIG, "botocore", False),  # a user's config_kwargs asked botocore to check GETs itself
    ],
    ids=["pooled", "pooled-pipelined", "small", "botocore-checks"],
)
def test_a_body_damaged_in_transit_fails_s3s_checksum_and_a_damaged_object_fails_ours(
    s3_server: S3Server,
    proxied: TcpProxy,
    request: pytest.FixtureRequest,
    shape: tuple[int, ...],
    checker: str,
    pipelined: bool,
) -> None:
    prefix = _prefix(request)
    more: dict[str, Any] = {}
    if checker == "botocore":
        more["config_kwargs"] = {"response_checksum_validation": "when_supported"}
    store = _backend(
        s3_server,
        prefix,
        endpoint_url=f"http://127.0.0.1:{proxied.port}",
        pipelined=pipelined,
        timeout=5.0,
        **more,
    )
    client = s3_server.client()
    sent, stored_bad = make_key("in-transit"), make_key("stored-bad")
    nbytes = chunk(6, shape).numel() * 2

    def read(key: Any) -> Any:
        return store.batched_get([key])[0] if pipelined else store.get(key)

    try:
        _seed(store, sent, chunk(6, shape))  # uploaded with botocore's CRC, which S3 keeps
        # Every reply longer than this has a bit flipped: at least one payload byte of the body.
        proxied.set_mode("flip", flip_every=nbytes * 6 // 10)
        before = store.stats["remote_errors"]
        assert read(sent) is None
        assert store.stats["remote_errors"] > before  # S3's checksum refused the body...
        assert store.stats["corrupt"] == 0  # ...before our checksum ever saw it
        # ...and the check was the one this case is about, not both or neither.
        s3 = store.connector.fs.s3
        ours = checker == "ours"
        assert s3.meta.config.response_checksum_validation == ("when_required" if ours else "when_supported")
        assert (s3 in s3_checksum._hooked) is ours
        proxied.set_mode("forward")
        assert wait_until(lambda: same(read(sent), chunk(6, shape)))
        # An object stored damaged carries a CRC of its damaged bytes: ours catches it.
        blob = bytearray(chunk_format.encode_bytes(chunk(7, shape), stored_bad.to_string()))
        blob[-1] ^= 0x01
        client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/{layout.key_to_path(stored_bad)}", Body=bytes(blob))
        assert read(stored_bad) is None
        assert store.stats["corrupt"] == 1
    finally:
        proxied.set_mode("forward")
        store.close()
        client.close()
