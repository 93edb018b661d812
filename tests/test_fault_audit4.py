"""Fault audit 4: the remote and hybrid tiers against real servers that fail mid-call.

Each test is a regression for a defect found by this audit (see the docstrings).
Bounds are generous "returns within N seconds" checks, never performance assertions.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import torch

from lmcache_core import CacheEngineKey, LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.errors import StoreUnavailableError
from lmcache_core.storage_backend.circuit import CircuitBreaker
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
from tests.conftest import make_key, wait_until
from tests.tcp_proxy import TcpProxy

T = 0.5  # remote_timeout: short, so dead-server paths stay fast
META = LMCacheEngineMetadata(model_name="test/model")
SHAPE = (2, 2, 16, 2, 8)
CHUNK_BYTES = 2 * 2 * 16 * 2 * 8 * 2  # float16


def chunk(value: float) -> torch.Tensor:
    return torch.full(SHAPE, float(value), dtype=torch.float16)


def value_of(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.flatten()[0])


def proxied_url(proxy: TcpProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}/0?prefix=audit4-{uuid.uuid4().hex[:8]}:"


def hybrid(url: str, chunks_in_memory: float = 2.5) -> LMCHybridBackend:
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu",
        remote_url=url,
        remote_timeout=T,
        max_local_cache_size=chunks_in_memory * CHUNK_BYTES / 1024**3,
    )
    return LMCHybridBackend(cfg, META, None, "cpu")


def remote(url: str, pipelined: bool = False) -> LMCRemoteBackend:
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    cfg = LMCacheEngineConfig(remote_url=url, remote_timeout=T)
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=0.5, name="audit4")
    return cls(cfg, None, "cpu", breaker=breaker)


def evict_from_memory(store: LMCHybridBackend, n: int = 4) -> None:
    for i in range(n):
        store.put(make_key(f"filler-{uuid.uuid4().hex}-{i}"), chunk(100 + i), blocking=True)


# -- defect 1: the remote's older chunk served after a newer put or a remove ------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
def test_hybrid_never_serves_the_remotes_older_chunk_after_a_put_the_remote_missed(redis_server, blocking):
    """A hybrid put whose remote write failed (the server reset the connection) was
    acknowledged from the local tiers; once the memory tier evicted the chunk, a get
    read the remote's older chunk under the key: a stale tensor after a newer put."""
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        store = hybrid(proxied_url(proxy))
        try:
            key = make_key("stale-after-put")
            store.put(key, chunk(1), blocking=True)
            proxy.set_mode("reset")
            store.put(key, chunk(2), blocking=blocking)  # acknowledged: the memory tier has it
            assert value_of(store.get(key)) == 2
            if not blocking:
                assert wait_until(lambda: store.remote.stats["background_put_failures"] == 1)
            proxy.set_mode("forward")
            evict_from_memory(store)
            assert not store.local_tiers[0][1].contains(key)
            got = store.get(key)
            assert value_of(got) != 1, "the remote's older chunk was served after a newer put"
            assert got is None
            assert not store.contains(key)
            # A put that reaches the remote again makes the key readable from it.
            store.put(key, chunk(3), blocking=True)
            evict_from_memory(store)
            assert value_of(store.get(key)) == 3
        finally:
            store.close()


def test_hybrid_remove_while_the_remote_is_down_does_not_come_back(redis_server):
    """A hybrid remove dropped the local copies and logged the remote's failure; after
    the remote came back, a get read the removed chunk from it again."""
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        store = hybrid(proxied_url(proxy))
        try:
            key = make_key("removed-while-down")
            store.put(key, chunk(1), blocking=True)
            proxy.set_mode("reset")
            with pytest.raises(StoreUnavailableError):  # the remote may still hold it: said so
                store.remove(key)
            assert all(not tier.contains(key) for _, tier in store.local_tiers)  # still emptied
            proxy.set_mode("forward")
            assert store.get(key) is None
            assert not store.contains(key)
            assert store.batched_get([key]) == [None]
            # A remove that reaches the remote clears the mark (nothing to serve either way).
            assert wait_until(lambda: _removed(store, key))
            store.put(key, chunk(4), blocking=True)
            evict_from_memory(store)
            assert value_of(store.get(key)) == 4
        finally:
            store.close()


def _removed(store: LMCHybridBackend, key) -> bool:
    try:
        store.remote.remove(key)
        return True
    except StoreUnavailableError:
        return False


def _a_queued_overwrite_fails(store: Any, proxy: TcpProxy, key: CacheEngineKey) -> None:
    """Store chunk 1 under ``key``, then have a queued put of chunk 2 fail (connection
    resets), and let the remote answer again: it still holds chunk 1."""
    store.put(key, chunk(1), blocking=True)
    proxy.set_mode("reset")
    store.put(key, chunk(2), blocking=False)
    assert wait_until(lambda: store.stats["background_put_failures"] == 1)
    proxy.set_mode("forward")


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_remote_get_after_a_failed_queued_put_is_a_miss_not_the_older_chunk(redis_server, pipelined):
    """put(blocking=False) of a newer chunk was acknowledged; its write failed (logged and
    counted); get and batched_get then returned the older chunk the server still held."""
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        store = remote(proxied_url(proxy), pipelined)
        try:
            key = make_key("queued-put-failed")
            _a_queued_overwrite_fails(store, proxy, key)
            time.sleep(0.6)  # the circuit's cooldown
            assert value_of(store.get(key)) is None
            assert [value_of(t) for t in store.batched_get([key])] == [None]
            assert store.read_header(key) is None
            store.put(key, chunk(3), blocking=True)
            assert value_of(store.get(key)) == 3
            assert [value_of(t) for t in store.batched_get([key])] == [3]
        finally:
            store.close()


def test_a_forked_child_keeps_the_parents_failed_write_marks(redis_server):
    """A child forked after a failed queued put started with no marks, and served the
    remote's older chunk of the key the parent had acknowledged a newer put of."""
    import os

    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        store = remote(proxied_url(proxy))
        try:
            key = make_key("fork-stale")
            _a_queued_overwrite_fails(store, proxy, key)
            pid = os.fork()
            if pid == 0:  # the child: exit status 0 = a miss, 1 = the older chunk, 2 = error
                code = 2
                try:
                    code = 0 if store.get(key) is None else 1
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child served the older chunk"
        finally:
            store.close()
