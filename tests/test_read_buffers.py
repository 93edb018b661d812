"""Reads into reused warm buffers: a buffer goes back to its pool only once the
tensor handed out over it is dropped, and never while a caller still holds one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import open_backend

KEY = CacheEngineKey("vllm", "m", 1, 0, f"{7:064x}")


def _reuse_checks(store: Any, batched: bool = False) -> None:
    # Just over 256 KiB (a "large" Redis reply), of a size no other test uses: the
    # Redis reply pool is shared by the process, and must hold only this test's buffer.
    chunk = torch.randn(4, 2, 131, 8, 16).to(torch.bfloat16)
    store.put(KEY, chunk)

    def read() -> Any:
        return store.batched_get([KEY])[0] if batched else store.get(KEY)

    first = read()
    assert first is not None and torch.equal(first, chunk)
    ptr = first.data_ptr()
    del first
    for _ in range(3):  # dropped, so the next read lands in the same warm memory
        again = read()
        assert again is not None and torch.equal(again, chunk)
        assert again.data_ptr() == ptr
        del again
    held = read()
    other = read()  # must not overwrite what the caller still holds
    assert held is not None and other is not None
    assert held.data_ptr() != other.data_ptr()
    other.fill_(0)
    assert torch.equal(held, chunk)


def test_local_directory_remote_reuses_read_buffers(tmp_path: Path) -> None:
    store = open_backend(f"fsspec+file://{tmp_path}", dst_device="cpu")
    try:
        _reuse_checks(store)
    finally:
        store.close()


def test_pipelined_batched_get_lets_go_of_its_buffers(tmp_path: Path) -> None:
    # The fetch and decode threads must not keep the last batch alive.
    store = open_backend(f"fsspec+file://{tmp_path}", dst_device="cpu", pipelined=True)
    try:
        _reuse_checks(store, batched=True)
    finally:
        store.close()


def test_redis_large_replies_reuse_buffers(redis_server: Any) -> None:
    store = open_backend(redis_server.url + "?prefix=reuse-test:", dst_device="cpu")
    try:
        _reuse_checks(store)
    finally:
        store.remove(KEY)
        store.close()


def test_local_directory_remote_reads_and_checks_a_large_chunk(tmp_path: Path) -> None:
    """A chunk of SPLIT_READ_MIN_BYTES or more is read on two threads (the store's own
    checksum threads); its bytes come back whole, and a flipped byte is a miss."""
    from lmcache_core import chunk_format

    store = open_backend(f"fsspec+file://{tmp_path}", dst_device="cpu")
    try:
        n = chunk_format.SPLIT_READ_MIN_BYTES + 3 * chunk_format.READ_PIECE_BYTES + 6
        big = torch.randn(n // 2, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        store.put(KEY, big)
        got = store.get(KEY)
        assert got is not None and torch.equal(got, big)
        del got
        (path,) = [p for p in tmp_path.rglob("*.safetensors")]
        with open(path, "r+b") as f:
            f.seek(-(2 * chunk_format.READ_PIECE_BYTES), 2)
            b = f.read(1)
            f.seek(-(2 * chunk_format.READ_PIECE_BYTES), 2)
            f.write(bytes([b[0] ^ 0x40]))
        assert store.get(KEY) is None
        assert store.stats["corrupt"] == 1
    finally:
        store.close()


def test_disk_batched_get_reads_each_large_chunk_on_one_thread(tmp_path: Path) -> None:
    """A disk ``batched_get`` already reads two chunks side by side, so a chunk of
    SPLIT_READ_MIN_BYTES or more is not split over a helper as well (four threads on two
    cores ran 20 % slower). Each read sleeps 1 ms here, so a split chunk would
    certainly be read by two threads (the helper claims pieces while the caller sleeps)."""
    import threading
    import time
    from collections import defaultdict

    from lmcache_core import chunk_format
    from lmcache_core.storage_backend import disk_io

    store = open_backend(str(tmp_path / "store"), dst_device="cpu")
    n = chunk_format.SPLIT_READ_MIN_BYTES + 6
    chunks = {
        CacheEngineKey("vllm", "m", 1, 0, f"{i:064x}"): torch.randn(
            n // 2, generator=torch.Generator().manual_seed(i)
        ).to(torch.bfloat16)
        for i in range(4)
    }
    try:
        for key, chunk in chunks.items():
            store.put(key, chunk)
        readers: defaultdict[str, set[int]] = defaultdict(set)
        me = threading.get_ident()
        helper_read = threading.Event()
        wait_for_helper = [False]

        def slow_read(op: str, path: str) -> None:
            if op == "read":
                readers[path].add(threading.get_ident())
                if threading.get_ident() != me:
                    helper_read.set()
                elif wait_for_helper[0]:
                    # The caller gives a helper up to 0.5 s per read to join (its two
                    # header reads come before any helper exists, so no assertion here).
                    helper_read.wait(0.5)
                time.sleep(0.001)

        with disk_io.fault_hook(slow_read):
            got = store.batched_get(list(chunks))
        assert all(g is not None and torch.equal(g, c) for g, c in zip(got, chunks.values(), strict=True))
        assert len(readers) == len(chunks)
        assert all(len(threads) == 1 for threads in readers.values()), "a chunk was split over threads"
        del got
        readers.clear()
        helper_read.clear()  # batched_get's reader set it
        wait_for_helper[0] = True
        with disk_io.fault_hook(slow_read):
            one = store.get(next(iter(chunks)))  # alone, a get still splits its chunk
        assert one is not None and torch.equal(one, next(iter(chunks.values())))
        assert [len(threads) for threads in readers.values()] == [2]
    finally:
        store.close()


def test_a_streaming_remote_keeps_warm_buffers_for_a_batch_of_16(tmp_path: Path) -> None:
    """Sixteen chunks of the metadata's size held at once (a batched_get) reuse warm
    buffers: with room for only eight, the other eight page-faulted fresh memory each time."""
    from lmcache_core import LMCacheEngineConfig
    from lmcache_core.config import LMCacheEngineMetadata
    from lmcache_core.storage_backend import mem_pool, remote_backend

    meta = LMCacheEngineMetadata(model_name="m", kv_dtype=torch.bfloat16, kv_shape=(32, 2, 256, 8, 128))
    assert mem_pool.read_pool_bytes(meta) == 16 * (32 << 20)
    assert mem_pool.read_pool_bytes(None) == mem_pool.READ_POOL_BYTES
    small = LMCacheEngineMetadata(model_name="m", kv_dtype=torch.bfloat16, kv_shape=(2, 2, 16, 8, 128))
    assert mem_pool.read_pool_bytes(small) == mem_pool.READ_POOL_BYTES  # never below
    cfg = LMCacheEngineConfig.from_defaults(remote_url=f"fsspec+file://{tmp_path}")
    store = remote_backend.LMCRemoteBackend(cfg, meta, "cpu")
    disk = open_backend(str(tmp_path / "disk"), dst_device="cpu", metadata=meta)
    try:
        assert store._read_buffers.max_bytes == 16 * (32 << 20)
        assert disk._pool.max_bytes == 16 * (32 << 20)  # the disk tier sizes its pool the same way
    finally:
        store.close()
        disk.close()


def test_a_pipelined_local_directory_batch_reads_each_chunk_alone(tmp_path: Path, monkeypatch: Any) -> None:
    """Several fetch groups read side by side, so none also splits its chunks over the
    checksum helpers; a single get, and a batch of one group, still may."""
    from lmcache_core import LMCacheEngineConfig, chunk_format
    from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend

    cfg = LMCacheEngineConfig.from_defaults(remote_url=f"fsspec+file://{tmp_path}", pipelined_backend=True)
    store = LMCPipelinedRemoteBackend(cfg, None, "cpu", fetch_parallelism=4)
    keys = [CacheEngineKey("vllm", "m", 1, 0, f"{i:064x}") for i in range(8)]
    chunks = [torch.randn(4, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    helpers: list[Any] = []
    real = store._read_stream

    def spy(key: Any, helper: Any = None) -> Any:
        helpers.append(helper)
        return real(key, helper)

    monkeypatch.setattr(store, "_read_stream", spy)
    try:
        for k, c in zip(keys, chunks, strict=True):
            store.put(k, c)
        got = store.batched_get(keys)
        assert all(g is not None and torch.equal(g, c) for g, c in zip(got, chunks, strict=True))
        assert len(helpers) == 8 and set(helpers) == {chunk_format.ALONE}
        helpers.clear()
        assert torch.equal(store.get(keys[0]), chunks[0])
        assert helpers == [None]  # a single get: the store's own checksum helpers
    finally:
        store.close()
