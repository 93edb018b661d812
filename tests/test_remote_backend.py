"""LMCRemoteBackend beyond the conformance suite: registry, hostile objects, retries,
circuit breaker, hard timeouts, pipelined batches, fork safety.

Store behaviour runs on real fsspec stores (memory://, a local directory); the
retry/breaker/timeout unit tests use small fake *connectors* whose failures can
be counted exactly. S3 faults against a real server are in test_fsspec_s3.py.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import torch

from lmcache_core import chunk_format, layout
from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import open_backend
from lmcache_core.storage_backend.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from lmcache_core.storage_backend.connector.base import RemoteConnector, RemoteObject
from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector, PartsReader
from lmcache_core.storage_backend.connector.registry import connector_for, known_schemes
from lmcache_core.storage_backend.remote_backend import (
    LMCPipelinedRemoteBackend,
    LMCRemoteBackend,
    RetryPolicy,
)
from tests.cases_fsspec import store_prefix
from tests.conftest import make_key
from tests.test_conformance import chunk, same


class _Ctx:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path


def _memory_url(tmp_path: Path) -> str:
    return f"memory://{store_prefix(_Ctx(tmp_path))}"  # type: ignore[arg-type]


def _config(url: str = "memory://unused", timeout: float = 1.0) -> LMCacheEngineConfig:
    return LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=timeout)


@pytest.fixture(params=["memory", "file"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return _memory_url(tmp_path)
    return f"fsspec+file://{tmp_path / 'remote'}"


@pytest.fixture(params=[LMCRemoteBackend, LMCPipelinedRemoteBackend], ids=["plain", "pipelined"])
def backend(request: pytest.FixtureRequest, store_url: str) -> Iterator[LMCRemoteBackend]:
    b = request.param(_config(store_url), None, "cpu")
    yield b
    b.close()


# -- registry ----------------------------------------------------------------------


def test_registry_routes_fsspec_schemes(tmp_path: Path) -> None:
    for url in (_memory_url(tmp_path), f"file://{tmp_path}/a", f"fsspec+file://{tmp_path}/b"):
        conn = connector_for(url, timeout=1.0)
        assert isinstance(conn, FsspecConnector)
        conn.close()
    assert known_schemes() == sorted(known_schemes())
    assert {"redis", "rediss", "unix", "redis+cluster", "s3", "s3a", "memory", "file"} <= set(known_schemes())


def test_registry_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        connector_for("bogus://host/x", timeout=1.0)
    for scheme in ("redis", "s3", "memory"):
        assert scheme in str(err.value)
    with pytest.raises(ValueError):
        connector_for("no-scheme-here", timeout=1.0)


def test_registry_missing_s3fs_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    registry_module = sys.modules["fsspec.registry"]  # fsspec.registry is also a mapping's name

    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs now raises ImportError
    monkeypatch.delitem(registry_module._registry, "s3", raising=False)
    with pytest.raises(ImportError, match=r"lmcache-toolkit\[s3\]"):
        connector_for("s3://bucket/prefix", timeout=1.0)


def test_registry_missing_redis_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "lmcache_core.storage_backend.connector.redis_connector", raising=False)
    with pytest.raises(ImportError, match=r"lmcache-toolkit\[redis\]"):
        connector_for("redis://127.0.0.1:1/0", timeout=1.0)


def test_registry_missing_fsspec_plugin_is_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import gcsfs` fail as if it were not installed,
    # whether or not this machine has it.
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(ImportError, match="gcsfs"):
        connector_for("gs://bucket/prefix", timeout=1.0)


def test_open_backend_memory_url(tmp_path: Path) -> None:
    with open_backend(_memory_url(tmp_path)) as store:
        assert isinstance(store, LMCRemoteBackend)
        store.put(make_key(1), chunk(1))
        assert same(store.get(make_key(1)), chunk(1))
    with open_backend(_memory_url(tmp_path), pipelined=True) as store:
        assert isinstance(store, LMCPipelinedRemoteBackend)
        assert same(store.batched_get([make_key(1)])[0], chunk(1))


def test_parts_reader_reads_and_seeks_across_parts() -> None:
    parts: list[bytes | memoryview] = [b"head", memoryview(bytearray(b"0123456789")), b"", b"tail"]
    whole = b"head0123456789tail"
    r = PartsReader(parts)
    assert len(r) == len(whole)
    assert r.read() == whole
    r.seek(6)
    assert r.read(5) == whole[6:11]
    r.seek(-3, os.SEEK_END)
    assert r.read() == b"ail"


# -- hostile objects under the prefix -----------------------------------------------


def _plant(backend: LMCRemoteBackend, rel_path: str, data: bytes) -> None:
    conn = backend.connector
    assert isinstance(conn, FsspecConnector)
    path = f"{conn.root}/{rel_path}"
    conn.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    conn.fs.pipe_file(path, data)


def test_foreign_objects_are_skipped_by_list(backend: LMCRemoteBackend) -> None:
    good = make_key("good")
    backend.put(good, chunk(1))
    other = make_key("other")
    _plant(backend, "README.txt", b"not a chunk")
    _plant(backend, "vllm/notes.safetensors", b"x")  # chunk suffix, wrong place
    bad_rank = layout.key_to_path(other).replace("/1-0/", "/one-0/")
    _plant(backend, bad_rank, b"x")
    _plant(backend, layout.key_to_path(other) + ".tmp", b"x")  # a writer's temp name
    assert backend.list() == [good]
    assert [i.key for i in backend.list_info()] == [good]


@pytest.mark.parametrize(
    "kind", ["garbage", "truncated", "bit-flip", "other-key", "huge-header-length", "empty"]
)
def test_corrupt_object_is_a_miss(backend: LMCRemoteBackend, kind: str) -> None:
    key = make_key(f"corrupt-{kind}")
    value = chunk(3)
    raw = bytearray(chunk_format.encode_bytes(value, key.to_string()))
    if kind == "garbage":
        raw = bytearray(os.urandom(200))
    elif kind == "truncated":
        raw = raw[: len(raw) - 10]
    elif kind == "bit-flip":
        raw[-1] ^= 0x01
    elif kind == "other-key":
        raw = bytearray(chunk_format.encode_bytes(value, make_key("someone-else").to_string()))
    elif kind == "huge-header-length":
        raw[:8] = (2**60).to_bytes(8, "little")
    elif kind == "empty":
        raw = bytearray()
    _plant(backend, layout.key_to_path(key), bytes(raw))
    assert backend.get(key) is None
    assert backend.batched_get([key]) == [None]
    assert backend.stats["corrupt"] >= 1
    if kind in ("garbage", "huge-header-length", "empty", "other-key"):
        assert backend.read_header(key) is None


class _Sentinel:
    """Unpickling this creates a file: proof that bytes were unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


def test_planted_pickle_never_executes(backend: LMCRemoteBackend, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Sentinel(str(sentinel)))
    assert not sentinel.exists()
    keys = [make_key(f"pickle-{i}") for i in range(3)]
    # plain pickle; torch.save's zip-of-pickle; a chunk header followed by a pickle
    _plant(backend, layout.key_to_path(keys[0]), payload)
    import io

    buf = io.BytesIO()
    torch.save({"x": _Sentinel(str(sentinel))}, buf)
    _plant(backend, layout.key_to_path(keys[1]), buf.getvalue())
    header = chunk_format.encode_header(torch.zeros(len(payload), dtype=torch.uint8), keys[2].to_string())
    _plant(backend, layout.key_to_path(keys[2]), header + payload)
    assert not sentinel.exists()
    for key in keys:
        assert backend.get(key) is None
        backend.read_header(key)
        backend.contains(key)
    assert backend.batched_get(keys) == [None, None, None]
    assert set(backend.list()) == set(keys)  # names are valid; the bytes are never trusted
    assert not sentinel.exists()


def test_read_header_is_a_ranged_read(backend: LMCRemoteBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    key, value = make_key("hdr"), chunk(5, shape=(2, 2, 64, 2, 8))
    backend.put(key, value)
    calls: list[int] = []
    real_head = backend.connector.get_head

    def spy_head(k: CacheEngineKey, nbytes: int) -> tuple[bytes, int] | None:
        calls.append(nbytes)
        return real_head(k, nbytes)

    def no_full_get(k: CacheEngineKey) -> bytes | None:
        raise AssertionError("read_header fetched the whole object")

    monkeypatch.setattr(backend.connector, "get_head", spy_head)
    monkeypatch.setattr(backend.connector, "get", no_full_get)
    monkeypatch.setattr(backend.connector, "get_hashed", no_full_get)  # Redis reads through its own _get
    header = backend.read_header(key)
    assert header is not None
    assert header.shape == tuple(value.shape) and header.dtype == "F16"
    assert header.key == key.to_string()
    assert calls and all(n <= 4096 for n in calls)
    assert backend.read_header(make_key("absent")) is None


def test_list_info_has_sizes_and_times(backend: LMCRemoteBackend) -> None:
    key = make_key("info")
    before = time.time()
    backend.put(key, chunk(2))
    (info,) = backend.list_info()
    assert info.key == key
    assert info.size == len(chunk_format.encode_bytes(chunk(2), key.to_string()))
    assert info.mtime is None or before - 5 <= info.mtime <= time.time() + 5


def test_known_key_cache_is_invalidated_by_a_miss(backend: LMCRemoteBackend) -> None:
    key = make_key("known")
    backend.put(key, chunk(1))
    assert backend.contains(key)
    # Another process removes it behind our back.
    conn = backend.connector
    assert isinstance(conn, FsspecConnector)
    conn.fs.rm_file(conn.path(key))
    assert backend.contains(key)  # still believed (a hint, like LMCache's)
    assert backend.get(key) is None
    assert not backend.contains(key)  # the miss corrected the cache


def test_remove_cancels_a_queued_write(backend: LMCRemoteBackend) -> None:
    for i in range(20):
        key = make_key(f"rm{i}")
        backend.put(key, chunk(i), blocking=False)
        backend.remove(key)
        assert not backend.contains(key)
    backend.close()
    reopened = type(backend)(backend.config, None, "cpu")
    try:
        assert reopened.list() == []
    finally:
        reopened.close()


def test_blocking_put_supersedes_a_queued_one(backend: LMCRemoteBackend) -> None:
    key = make_key("order")
    backend.put(key, chunk(1), blocking=False)
    backend.put(key, chunk(2), blocking=True)
    backend.close()
    reopened = type(backend)(backend.config, None, "cpu")
    try:
        assert same(reopened.get(key), chunk(2))
    finally:
        reopened.close()


# -- pipelined batches --------------------------------------------------------------


def test_pipelined_alignment_with_misses_and_concurrent_callers(store_url: str) -> None:
    backend = LMCPipelinedRemoteBackend(_config(store_url, timeout=5.0), None, "cpu", fetch_parallelism=3)
    try:
        stored = {make_key(f"p{i}"): chunk(i) for i in range(12)}
        for k, v in stored.items():
            backend.put(k, v)
        absent = [make_key(f"absent{i}") for i in range(6)]
        errors: list[BaseException] = []

        def caller(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(5):
                    keys = list(stored) + absent
                    rng.shuffle(keys)
                    keys = keys[: rng.randint(1, len(keys))]
                    got = backend.batched_get(keys)
                    assert len(got) == len(keys)
                    for k, g in zip(keys, got, strict=True):
                        if k in stored:
                            assert same(g, stored[k]), k
                        else:
                            assert g is None
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        # a miss in the middle never shifts the others; duplicates are fine
        k0, k1 = list(stored)[:2]
        got = backend.batched_get([k0, absent[0], k1, k0, absent[1]])
        assert same(got[0], stored[k0]) and got[1] is None and same(got[2], stored[k1])
        assert same(got[3], stored[k0]) and got[4] is None
        assert backend.batched_get([]) == []
    finally:
        backend.close()


def test_pipelined_batch_sees_queued_writes(store_url: str) -> None:
    backend = LMCPipelinedRemoteBackend(_config(store_url), None, "cpu")
    try:
        items = [(make_key(f"q{i}"), chunk(i)) for i in range(6)]
        backend.batched_put(items, blocking=False)
        got = backend.batched_get([k for k, _ in items])
        assert all(same(g, v) for g, (_, v) in zip(got, items, strict=True))
    finally:
        backend.close()


# -- fake connectors for exact failure counts ----------------------------------------


class FlakyConnector(RemoteConnector):
    """A dict of bytes whose calls fail ``fail_next`` times before working; counts calls."""

    display_url = "fake://flaky"

    def __init__(self) -> None:
        self.data: dict[CacheEngineKey, bytes] = {}
        self.fail_next = 0
        self.calls = 0
        self.call_times: list[float] = []
        self.hang = threading.Event()  # set: every call blocks until released
        self.release = threading.Event()
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.call_times.append(time.monotonic())
            failing = self.fail_next > 0
            if failing:
                self.fail_next -= 1
        if self.hang.is_set():
            self.release.wait(30)
        if failing:
            raise ConnectionError("injected failure")

    def get(self, key: CacheEngineKey) -> bytes | None:
        self._enter()
        return self.data.get(key)

    def get_many(self, keys: Sequence[CacheEngineKey]) -> list[bytes | None]:
        self._enter()
        return [self.data.get(k) for k in keys]

    def put(self, key: CacheEngineKey, parts: Sequence[bytes | memoryview]) -> None:
        self._enter()
        self.data[key] = b"".join(parts)

    def exists(self, key: CacheEngineKey) -> bool:
        self._enter()
        return key in self.data

    def delete(self, key: CacheEngineKey) -> bool:
        self._enter()
        return self.data.pop(key, None) is not None

    def list(self) -> Iterator[RemoteObject]:
        self._enter()
        return iter([RemoteObject(k, len(v)) for k, v in self.data.items()])


def _fake_backend(
    conn: FlakyConnector,
    *,
    timeout: float = 1.0,
    attempts: int = 3,
    threshold: int = 100,
    reset: float = 0.3,
    pipelined: bool = False,
) -> LMCRemoteBackend:
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    return cls(
        _config(timeout=timeout),
        None,
        "cpu",
        connector=conn,
        retry=RetryPolicy(attempts=attempts, base_delay=0.01, max_delay=0.05, jitter=0.0),
        breaker=CircuitBreaker(threshold, reset),
    )


def test_retry_policy_is_capped_exponential() -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=0.5, multiplier=2.0, jitter=0.0)
    assert [policy.delay(i) for i in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = RetryPolicy(base_delay=1.0, max_delay=10.0, jitter=0.1)
    assert all(0.9 <= jittered.delay(0) <= 1.1 for _ in range(50))
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


@pytest.mark.parametrize("failures", [0, 1, 2])
def test_get_retries_until_it_succeeds(failures: int) -> None:
    conn = FlakyConnector()
    backend = _fake_backend(conn, attempts=3)
    try:
        key = make_key("retry")
        backend.put(key, chunk(1))
        conn.calls = 0
        conn.call_times.clear()
        conn.fail_next = failures
        assert same(backend.get(key), chunk(1))
        assert conn.calls == failures + 1
        assert backend.stats["retries"] == failures
        gaps = [b - a for a, b in zip(conn.call_times, conn.call_times[1:], strict=False)]
        assert all(g >= 0.009 for g in gaps)  # it backed off between tries
    finally:
        backend.close()


def test_get_gives_up_after_the_attempts_and_is_a_miss() -> None:
    conn = FlakyConnector()
    backend = _fake_backend(conn, attempts=3)
    try:
        key = make_key("retry")
        backend.put(key, chunk(1))
        conn.calls = 0
        conn.fail_next = 3
        assert backend.get(key) is None
        assert conn.calls == 3
        assert backend.stats["unavailable"] == 1
        assert same(backend.get(key), chunk(1))  # and works again afterwards
    finally:
        backend.close()


def test_puts_are_retried_and_raise_only_when_every_attempt_fails() -> None:
    conn = FlakyConnector()
    backend = _fake_backend(conn, attempts=3)
    try:
        conn.fail_next = 2
        backend.put(make_key("p"), chunk(1))
        assert conn.calls == 3 and backend.stats["retries"] == 2
        assert same(backend.get(make_key("p")), chunk(1))
        conn.calls, conn.fail_next = 0, 3
        with pytest.raises(StoreUnavailableError):
            backend.put(make_key("lost"), chunk(2))
        assert conn.calls == 3
        assert backend.stats["put_failures"] == 1
        conn.fail_next = 3
        backend.put(make_key("nb"), chunk(3), blocking=False)
        backend.close()
        assert backend.stats["background_put_failures"] == 1
        assert make_key("lost") not in conn.data and make_key("nb") not in conn.data
    finally:
        backend.close()


class InlineFlakyConnector(FlakyConnector):
    """A FlakyConnector that can put on the caller's thread (as Redis does for plain SETs),
    while ``open_connection`` is set; ``inline`` counts those puts."""

    open_connection = True
    inline = 0

    def puts_inline(self, size: int) -> bool:
        return True

    def put_chunk_by(self, key: CacheEngineKey, chunk: chunk_format.UnsealedChunk, deadline: float) -> bool:
        if not self.open_connection:
            return False
        self.inline += 1
        self._enter()
        self.data[key] = chunk.sealed_header() + bytes(chunk.payload)
        return True


def test_an_inline_put_counts_against_the_retry_policy_and_falls_back_to_an_io_thread() -> None:
    conn = InlineFlakyConnector()
    backend = _fake_backend(conn, attempts=3)
    try:
        backend.put(make_key("a"), chunk(1))
        assert (conn.inline, conn.calls, backend.stats["retries"]) == (1, 1, 0)
        # The inline try fails: the rest of the policy's attempts go by an I/O thread.
        conn.inline = conn.calls = 0
        conn.fail_next = 2
        backend.put(make_key("b"), chunk(2))
        assert (conn.inline, conn.calls, backend.stats["retries"]) == (1, 3, 2)
        # Every attempt fails: three in all, the inline one included, never four.
        conn.inline = conn.calls = 0
        conn.fail_next = 10
        with pytest.raises(StoreUnavailableError):
            backend.put(make_key("lost"), chunk(3))
        assert (conn.inline, conn.calls) == (1, 3)
        conn.fail_next = 0
        for k, v in ((make_key("a"), chunk(1)), (make_key("b"), chunk(2))):
            assert same(backend.get(k), v)
        assert make_key("lost") not in conn.data
    finally:
        backend.close()
    # Half-open: a put that finds no open connection is the breaker's one probe, sent by an
    # I/O thread (asking the breaker a second time would have refused it).
    conn = InlineFlakyConnector()
    backend = _fake_backend(conn, attempts=3, threshold=1, reset=0.2)
    try:
        conn.fail_next = 1
        with pytest.raises(StoreUnavailableError):
            backend.put(make_key("down"), chunk(5))
        assert backend.breaker.state == OPEN
        conn.open_connection = False
        time.sleep(0.25)
        backend.put(make_key("probe"), chunk(4))
        assert backend.breaker.state == CLOSED and same(backend.get(make_key("probe")), chunk(4))
    finally:
        backend.close()


def test_no_retry_is_started_that_could_outlive_the_callers_wait() -> None:
    """A try that failed slowly is retried only if a try as slow still ends before the
    deadline: a retry that outlived its caller would store the old chunk over the
    caller's next put of the same key."""

    class SlowFailure(FlakyConnector):
        puts = 0

        def put(self, key: CacheEngineKey, parts: Sequence[bytes | memoryview]) -> None:
            with self._lock:
                self.puts += 1
                call = self.puts
            if call == 1:
                time.sleep(0.3)  # a slow 500
                raise ConnectionError("injected failure")
            if call == 2:
                time.sleep(0.3)  # a retry as slow would end after the 0.5 s deadline
            self.data[key] = b"".join(parts)

    conn = SlowFailure()
    backend = _fake_backend(conn, timeout=0.5, attempts=3)
    key = make_key("ordered")
    try:
        with pytest.raises(StoreUnavailableError, match="injected"):
            backend.put(key, chunk(1))  # fails after its one try, within the timeout
        backend.put(key, chunk(2))
        time.sleep(0.5)  # a straggling retry of the first put would land by now
        assert same(backend.get(key), chunk(2))
        assert conn.puts == 2 and backend.stats["retries"] == 0
    finally:
        backend.close()


def test_a_put_whose_caller_gave_up_is_not_retried_or_held_against_the_remote() -> None:
    """An abandoned write (its caller timed out) publishes nothing, is tried once, and is
    no strike for the circuit breaker: the remote did nothing wrong."""
    from lmcache_core.errors import WriteAbandonedError

    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    class SlowHash(FlakyConnector):
        def put_chunk(self, key: CacheEngineKey, unsealed: chunk_format.UnsealedChunk) -> None:
            self._enter()
            entered.set()
            release.wait(10)  # still hashing when the caller times out
            try:
                super().put_chunk(key, unsealed)
            finally:
                finished.set()

    conn = SlowHash()
    backend = _fake_backend(conn, timeout=0.2, attempts=3, threshold=2)
    key = make_key("gave-up")
    try:
        with pytest.raises(StoreUnavailableError, match="timeout"):
            backend.put(key, chunk(1))
        assert entered.is_set()
        release.set()
        assert finished.wait(10)
        time.sleep(0.3)  # time for a retry (each backs off 0.01 s)
        assert key not in conn.data and conn.calls == 1  # no publish, no retry
        assert backend.breaker.state == CLOSED
        assert isinstance(WriteAbandonedError("s", "r"), StoreUnavailableError)
    finally:
        release.set()
        backend.close()


def test_a_full_store_is_an_answer_not_an_outage() -> None:
    """StoreFullError comes from a live server: no retry, and the circuit stays closed."""
    from lmcache_core.errors import StoreFullError

    class FullConnector(FlakyConnector):
        def put(self, key: CacheEngineKey, parts: Sequence[bytes | memoryview]) -> None:
            self._enter()
            raise StoreFullError(self.display_url, "maxmemory")

    conn = FullConnector()
    backend = _fake_backend(conn, attempts=3, threshold=2)
    try:
        conn.data[make_key("small")] = chunk_format.encode_bytes(chunk(1), make_key("small").to_string())
        for i in range(5):
            with pytest.raises(StoreFullError):
                backend.put(make_key(f"big{i}"), chunk(i))
        assert conn.calls == 5
        assert backend.breaker.state == CLOSED
        assert same(backend.get(make_key("small")), chunk(1))
        assert backend.stats["put_failures"] == 5
    finally:
        backend.close()


def test_pipelined_batch_retries_a_failed_group() -> None:
    conn = FlakyConnector()
    backend = _fake_backend(conn, attempts=3, pipelined=True)
    try:
        keys = [make_key(f"g{i}") for i in range(8)]
        for i, k in enumerate(keys):
            backend.put(k, chunk(i))
        conn.fail_next = 2
        got = backend.batched_get(keys)
        assert all(same(g, chunk(i)) for i, g in enumerate(got))
    finally:
        backend.close()


def test_circuit_breaker_states() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=10.0, clock=lambda: now[0])
    assert breaker.state == CLOSED and breaker.allow()
    breaker.record_failure()
    breaker.record_success()  # success resets the consecutive count
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == CLOSED
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()
    assert breaker.retry_after() == pytest.approx(10.0)
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and breaker.state == HALF_OPEN  # one probe
    assert not breaker.allow()  # ... and only one
    breaker.record_failure()
    assert breaker.state == OPEN  # the probe failed: another full cooldown
    now[0] = 15.0
    assert not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()
    assert breaker.times_opened == 2
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


def test_an_open_circuit_says_what_failed_last() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=5.0, clock=lambda: now[0])
    breaker.record_failure("get: ConnectionError: refused")
    breaker.record_failure()  # no cause given: the last one known stays
    now[0] = 1.0
    assert breaker.why_open() == "circuit open (retry in 4.0s; last failure: get: ConnectionError: refused)"
    breaker.reset()
    assert breaker.why_open() == "circuit open (retry in 0.0s)"


def test_breaker_opens_fails_fast_and_recovers() -> None:
    conn = FlakyConnector()
    backend = _fake_backend(conn, attempts=1, threshold=3, reset=0.3)
    try:
        key = make_key("cb")
        backend.put(key, chunk(1))
        conn.fail_next = 10**6
        for _ in range(3):
            assert backend.get(key) is None
        assert backend.breaker.state == OPEN
        calls = conn.calls
        start = time.monotonic()
        assert backend.get(key) is None
        assert not backend.contains(make_key("other"))
        with pytest.raises(StoreUnavailableError, match="circuit open"):
            backend.put(make_key("x"), chunk(2))
        assert conn.calls == calls  # failed fast: the remote was not asked
        assert time.monotonic() - start < 0.2
        assert backend.stats["circuit_rejections"] >= 3
        conn.fail_next = 0  # the remote comes back
        time.sleep(0.35)
        assert same(backend.get(key), chunk(1))  # the half-open probe succeeds
        assert backend.breaker.state == CLOSED
    finally:
        backend.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_hung_client_never_blocks_beyond_the_timeout(pipelined: bool) -> None:
    """A client with no timeout of its own that never answers: every call is still bounded."""
    conn = FlakyConnector()
    timeout = 0.3
    backend = _fake_backend(conn, timeout=timeout, threshold=100, pipelined=pipelined)
    key = make_key("hang")
    backend.put(key, chunk(1))
    conn.hang.set()
    try:
        for op in (
            lambda: backend.get(key),
            lambda: backend.contains(make_key("unknown")),
            lambda: backend.batched_get([key, make_key("x")]),
            lambda: backend.read_header(key),
        ):
            start = time.monotonic()
            result = op()
            assert time.monotonic() - start < timeout * 3
            assert result in (None, False, [None, None])
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            backend.put(make_key("p"), chunk(2))
        assert time.monotonic() - start < timeout * 3
        for i in range(3):
            backend.put(make_key(f"nb{i}"), chunk(i), blocking=False)
        start = time.monotonic()
        backend.close()
        assert time.monotonic() - start < backend.close_timeout + 1
        assert backend.stats["timeouts"] >= 5
    finally:
        conn.release.set()
        backend.close()


def test_close_is_bounded_when_every_queued_write_hangs() -> None:
    conn = FlakyConnector()
    backend = LMCRemoteBackend(
        _config(timeout=0.2), None, "cpu", connector=conn, breaker=CircuitBreaker(2, 30.0)
    )
    conn.hang.set()
    try:
        for i in range(20):
            backend.put(make_key(f"w{i}"), chunk(i), blocking=False)
        start = time.monotonic()
        backend.close()
        elapsed = time.monotonic() - start
        # two writes time out, the breaker opens, the other 18 fail fast
        assert elapsed < 0.2 * 2 * 2 + 1.0
        assert backend.stats["background_put_failures"] == 20
    finally:
        conn.release.set()


def test_closed_backend_refuses_calls(tmp_path: Path) -> None:
    backend = LMCRemoteBackend(_config(_memory_url(tmp_path)), None, "cpu")
    backend.close()
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.put(make_key(1), chunk(1))


# -- fork safety ----------------------------------------------------------------------


def _child_uses_parent_backend(backend: LMCRemoteBackend, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        assert same(backend.get(make_key("parent")), chunk(1))
        backend.put(make_key("child"), chunk(2))
        backend.close()
        queue.put("ok")
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put(repr(exc))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_reopens_and_works(tmp_path: Path) -> None:
    url = f"fsspec+file://{tmp_path / 'remote'}"
    backend = LMCPipelinedRemoteBackend(_config(url, timeout=5.0), None, "cpu")
    try:
        backend.put(make_key("parent"), chunk(1))
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_uses_parent_backend, args=(backend, queue))
        proc.start()
        assert queue.get(timeout=60) == "ok"
        proc.join(timeout=30)
        assert proc.exitcode == 0
        # the parent's backend is untouched by the child's close()
        assert same(backend.get(make_key("child")), chunk(2))
        assert backend.batched_get([make_key("parent")])[0] is not None
    finally:
        backend.close()


def test_the_keys_remembered_as_stored_are_bounded(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A serving process remembered every key it ever put or listed (for contains
    without a round trip): memory grew with the store, not with what it uses."""
    from lmcache_core.storage_backend import remote_backend

    monkeypatch.setattr(remote_backend, "KNOWN_KEYS_MAX", 4)
    backend = LMCRemoteBackend(_config(store_url), None, "cpu")
    keys = [make_key(f"known{i}") for i in range(10)]
    for k in keys:
        backend.put(k, torch.ones(1, 2, 4, 2, 8))
    assert len(backend._known) == 4
    assert all(backend.contains(k) for k in keys)  # forgotten ones are asked of the remote
    assert len(backend._known) == 4
    assert len(backend.list()) == 10 and len(backend._known) == 4
    backend.close()


def test_non_blocking_puts_wait_for_room_in_a_bounded_queue(tmp_path: Path) -> None:
    """The write queue had no bound: in front of a remote slower than the puts, queued
    chunks grew until the process ran out of memory. A put now waits for room
    (acknowledged only once queued), and close() wakes a put still waiting."""
    one = torch.ones(1, 2, 4, 2, 8)
    nbytes = one.numel() * one.element_size()
    backend = LMCRemoteBackend(_config(_memory_url(tmp_path), timeout=30.0), None, "cpu", max_queued_bytes=2 * nbytes)
    gate = threading.Event()
    real = backend.connector.put_chunk

    def slow_remote(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(30)
        return real(*args, **kwargs)

    backend.connector.put_chunk = slow_remote  # type: ignore[method-assign]
    keys = [make_key(f"bp{i}") for i in range(4)]
    backend.put(keys[0], one, blocking=False)
    backend.put(keys[1], one, blocking=False)  # the queue is full now
    returned = threading.Event()
    third = threading.Thread(target=lambda: (backend.put(keys[2], one, blocking=False), returned.set()))
    third.start()
    _wait_for(lambda: backend.stats["put_backpressure_waits"] == 1)
    assert not returned.is_set()  # waiting for room, not queued
    gate.set()  # the remote catches up
    assert returned.wait(30)
    third.join()
    backend.close()
    with LMCRemoteBackend(_config(_memory_url(tmp_path)), None, "cpu") as fresh:
        assert all(fresh.contains(k) for k in keys[:3])

    # close() while a put waits for room: the put raises (not acknowledged), nothing hangs.
    stuck = threading.Event()
    backend = LMCRemoteBackend(
        _config(_memory_url(tmp_path), timeout=30.0), None, "cpu", max_queued_bytes=nbytes, close_timeout=0.5
    )
    real = backend.connector.put_chunk
    backend.connector.put_chunk = lambda *a, **k: (stuck.wait(30), real(*a, **k))[1]  # type: ignore[method-assign]
    backend.put(keys[3], one, blocking=False)
    errors: list[BaseException] = []

    def waiting_put() -> None:
        try:
            backend.put(make_key("bp-late"), one, blocking=False)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    waiter = threading.Thread(target=waiting_put)
    waiter.start()
    _wait_for(lambda: backend.stats["put_backpressure_waits"] == 1)
    assert waiter.is_alive()
    closer = threading.Thread(target=backend.close)
    closer.start()
    waiter.join(10)
    assert not waiter.is_alive() and len(errors) == 1 and isinstance(errors[0], RuntimeError)
    stuck.set()
    closer.join(30)
    assert not closer.is_alive()


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` seconds (a thread never got there)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        time.sleep(0.01)
