"""Hybrid audit 6: prefetch bounded by each tier's own free room, and ``missing_tiers``
of a hybrid whose one tier is its memory.

The remote is a real fsspec ``file://`` store (no server needed); every wait is bounded.
"""

from __future__ import annotations

from typing import Any

import torch

from lmcache_core import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend, chunk_file_size
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend
from lmcache_core.tokens import ChunkedKVStore
from tests.conftest import make_key

META = LMCacheEngineMetadata(model_name="test/model")
SHAPE = (2, 2, 16, 2, 8)
GB = 1 << 30
WAIT_S = 30.0


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).half()


def file_remote(tmp_path: Any) -> str:
    return f"fsspec+file://{tmp_path / 'remote'}"


def test_prefetch_does_not_evict_a_warm_disk_smaller_than_the_memory_tier(tmp_path: Any) -> None:
    """Prefetch copied up to the memory tier's budget into every tier: a disk of 3 chunks
    behind a memory tier of 10 had the last run's 3 chunks evicted, and 10 chunks
    written into it one after another (each evicting the one before). Prefetch fills
    each tier's free room only."""
    url = file_remote(tmp_path)
    with LMCRemoteBackend(LMCacheEngineConfig.from_defaults(remote_url=url), META, "cpu") as writer:
        for i in range(10):
            writer.put(make_key(i), chunk(i))
    file_bytes = chunk_file_size(chunk(0), make_key(0).to_string())
    disk_gb = (3 * file_bytes + file_bytes // 2) / GB  # room for 3 chunk files
    warm = [make_key(f"warm{i}") for i in range(3)]
    disk_cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=str(tmp_path / "disk"), max_local_disk_size=disk_gb
    )
    with LMCLocalDiskBackend(disk_cfg, None, "cpu") as disk:  # the last run's cache
        for i, k in enumerate(warm):
            disk.put(k, chunk(100 + i))
        assert sorted(disk.list(), key=str) == sorted(warm, key=str)
    nbytes = chunk(0).numel() * chunk(0).element_size()
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu",
        local_disk=str(tmp_path / "disk"),
        max_local_cache_size=(10 * nbytes + nbytes // 2) / GB,
        max_local_disk_size=disk_gb,
        remote_url=url,
        prefetch=True,
    )
    backend = LMCHybridBackend(cfg, META, None, "cpu")
    try:
        assert backend.prefetch_done.wait(WAIT_S)
        named = dict(backend.local_tiers)
        memory, disk_tier = named["memory"], named["disk"]
        assert len(memory.list()) == 10  # the memory tier had room for all
        assert backend.prefetched == 10
        assert disk_tier.stats["evictions"] == 0, "prefetch evicted the warm disk cache"
        assert sorted(disk_tier.list(), key=str) == sorted(warm, key=str)
        for i, k in enumerate(warm):
            got = backend.get(k)
            assert got is not None and torch.equal(got, chunk(100 + i))
    finally:
        backend.close()


def test_prefetch_into_a_disk_only_hybrid_fills_its_free_room_only(tmp_path: Any) -> None:
    """A disk already half full: prefetch adds what fits beside it, evicting nothing."""
    url = file_remote(tmp_path)
    with LMCRemoteBackend(LMCacheEngineConfig.from_defaults(remote_url=url), META, "cpu") as writer:
        for i in range(6):
            writer.put(make_key(i), chunk(i))
    file_bytes = chunk_file_size(chunk(0), make_key(0).to_string())
    disk_gb = (4 * file_bytes + file_bytes // 2) / GB  # room for 4 chunk files
    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=str(tmp_path / "disk"), max_local_disk_size=disk_gb
    )
    warm = [make_key(f"warm{i}") for i in range(2)]
    with LMCLocalDiskBackend(cfg, None, "cpu") as disk:
        for i, k in enumerate(warm):
            disk.put(k, chunk(100 + i))
    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=str(tmp_path / "disk"), max_local_disk_size=disk_gb, remote_url=url, prefetch=True
    )
    backend = LMCHybridBackend(cfg, META, None, "cpu")
    try:
        assert backend.prefetch_done.wait(WAIT_S)
        disk_tier = dict(backend.local_tiers)["disk"]
        assert backend.prefetched == 2
        assert disk_tier.stats["evictions"] == 0
    finally:
        backend.close()
    with LMCLocalDiskBackend(cfg, None, "cpu") as disk:
        held = set(disk.list())
        assert set(warm) <= held and len(held) == 4


def test_memory_only_hybrid_store_skip_existing_stores_what_it_lacks(tmp_path: Any) -> None:
    """``missing_tiers`` left the memory tier out always: a hybrid whose one tier is its
    memory reported every key held, so ``store(skip_existing=True)`` stored nothing, and a
    chunk the memory tier refused counted as stored."""
    cfg = LMCacheEngineConfig.from_defaults(local_device="cpu", max_local_cache_size=0.01)
    backend = LMCHybridBackend(cfg, META, None, "cpu")
    try:
        k = make_key("m1")
        assert backend.missing_tiers(k) == ["memory"]
        backend.put(k, chunk(1))
        assert backend.missing_tiers(k) == []
        store = ChunkedKVStore(backend, "test/model", chunk_size=16)
        tokens = list(range(48))
        kv = torch.randn(2, 2, 48, 2, 8).half()
        result = store.store(tokens, kv, skip_existing=True)
        assert result.stored == 3 and result.skipped == 0
        assert store.lookup(tokens).tokens == 48
        again = store.store(tokens, kv, skip_existing=True)
        assert again.skipped == 3 and again.stored == 0
    finally:
        backend.close()
