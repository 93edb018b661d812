"""Memory- and disk-tier specifics on top of the conformance suite."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, LMCacheMemPoolMetadata, chunk_format
from lmcache_core.layout import WRITER_ID, key_to_path
from lmcache_core.storage_backend import CreateStorageBackend, open_backend
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend, save_disk
from lmcache_core.storage_backend.mem_pool import BufferPool
from tests.conftest import make_key

GB = 1024**3
SHAPE = (2, 2, 16, 2, 8)


def disk(tmp_path, budget_gb: float = 1.0) -> LMCLocalDiskBackend:
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path), max_local_disk_size=budget_gb)
    return LMCLocalDiskBackend(cfg, None, "cpu")


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).half()


# -- memory tier -------------------------------------------------------------------------


def test_pool_preallocates_budget_worth_of_slots():
    nbytes = chunk(0).numel() * 2
    cfg = LMCacheEngineConfig.from_defaults(max_local_cache_size=10 * nbytes / GB)
    backend = LMCLocalBackend(cfg, LMCacheMemPoolMetadata(SHAPE, torch.float16), "cpu")
    assert backend._pool.stats()["buffers"] == 10
    for i in range(25):  # more than fit: LRU evicts, slots are reused, no growth
        backend.put(make_key(i), chunk(i))
    assert backend._pool.stats()["buffers"] == 10
    assert len(backend.list()) == 10
    assert backend.used_bytes <= cfg.memory_budget_bytes
    backend.close()


def test_zero_copy_get_stays_valid_after_eviction():
    nbytes = chunk(0).numel() * 2
    cfg = LMCacheEngineConfig.from_defaults(max_local_cache_size=2 * nbytes / GB)
    backend = LMCLocalBackend(cfg, LMCacheMemPoolMetadata(SHAPE, torch.float16), "cpu")
    backend.put(make_key(0), chunk(0))
    held = backend.get(make_key(0))
    for i in range(1, 6):  # evicts key 0; its slot must not be reused while held
        backend.put(make_key(i), chunk(i))
    assert not backend.contains(make_key(0))
    assert torch.equal(held, chunk(0))
    backend.close()


def test_buffer_pool_reuses_released_buffers():
    pool = BufferPool("cpu", max_bytes=1 << 20)
    a = pool.acquire(4096)
    ptr = a.data_ptr()
    del a
    b = pool.acquire(4096)
    assert b.data_ptr() == ptr
    c = pool.acquire(4096)  # b still held: a different buffer
    assert c.data_ptr() != ptr


def test_cuda_destination_requires_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; covered by scripts/gpu_check.py")
    with pytest.raises(ValueError, match="no CUDA"):
        LMCLocalBackend(LMCacheEngineConfig(), None)  # the seed's default dst_device="cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_destination_round_trip(tmp_path):
    for backend in (LMCLocalBackend(LMCacheEngineConfig(), None, "cuda"), disk(tmp_path)):
        backend.dst_device = "cuda"
        backend.put(make_key(1), chunk(1))
        got = backend.get(make_key(1))
        assert got is not None and got.device.type == "cuda"
        assert torch.equal(got.cpu(), chunk(1))
        backend.close()


def test_reassigned_destination_is_the_one_gets_use(tmp_path):
    """``dst_device`` may be set after construction (as above): gets must follow it, not
    a device captured in ``__init__``. The move itself needs CUDA (the test above);
    without it, the assignment itself is refused and the destination stays put."""
    backend = disk(tmp_path)
    try:
        backend.put(make_key(1), chunk(1))
        if torch.cuda.is_available():
            backend.dst_device = "cuda"
            assert backend.dst_device == "cuda"
            got = backend.get(make_key(1))
            assert got is not None and got.device == torch.device("cuda", torch.cuda.current_device())
        else:
            with pytest.raises(ValueError, match="no CUDA device"):
                backend.dst_device = "cuda"
            assert backend.dst_device == "cpu"
        backend.dst_device = "cpu"
        got = backend.get(make_key(1))
        assert got is not None and got.device.type == "cpu" and torch.equal(got, chunk(1))
    finally:
        backend.close()


# -- disk tier ---------------------------------------------------------------------------


def test_restart_reuses_chunks_and_budget_holds(tmp_path):
    one = chunk(0).numel() * 2 + 512
    first = disk(tmp_path, budget_gb=10 * one / GB)
    for i in range(8):
        first.put(make_key(i), chunk(i))
    first.close()
    # A smaller budget on restart evicts down to it, oldest first.
    second = disk(tmp_path, budget_gb=5 * one / GB)
    assert second.used_bytes <= 5 * one
    kept = set(second.list())
    assert len(kept) == 5
    for k in kept:
        assert second.get(k) is not None
    for i in range(8, 12):
        second.put(make_key(i), chunk(i))
    assert second.used_bytes <= 5 * one
    second.close()


def test_stale_temp_files_removed_at_start(tmp_path):
    b = disk(tmp_path)
    b.put(make_key(1), chunk(1))
    b.close()
    final = tmp_path / key_to_path(make_key(1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = WRITER_ID  # as a temp name spells its writer: host and PID namespace
    stale = final.parent / f".{final.name}.{host}.{dead.stdout.strip()}.0.tmp"
    stale.write_bytes(b"partial")
    live = final.parent / f".{final.name}.{host}.{os.getpid()}.1.tmp"
    live.write_bytes(b"in flight")
    again = disk(tmp_path)
    assert not stale.exists()
    assert live.exists()  # a live writer's temp file is left alone
    assert again.stale_temps_removed == 1
    assert make_key(1) in again.list()
    again.close()


def _corrupt_and_read(tmp_path, mutate) -> tuple[LMCLocalDiskBackend, object]:
    b = disk(tmp_path)
    b.put(make_key(1), chunk(1))
    path = tmp_path / key_to_path(make_key(1))
    mutate(path)
    return b, b.get(make_key(1))


def test_truncated_file_is_a_miss_and_removed(tmp_path):
    b, got = _corrupt_and_read(tmp_path, lambda p: p.write_bytes(p.read_bytes()[:-10]))
    assert got is None and b.stats["corrupt"] == 1
    assert not b.contains(make_key(1))
    b.close()


def test_bit_flip_is_a_miss(tmp_path):
    def flip(p):
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2 + 100] ^= 0x10
        p.write_bytes(bytes(raw))

    b, got = _corrupt_and_read(tmp_path, flip)
    assert got is None and b.stats["corrupt"] == 1
    b.close()


def test_foreign_chunk_at_a_key_path_is_a_miss(tmp_path):
    b = disk(tmp_path)
    b.put(make_key(2), chunk(2))
    src = tmp_path / key_to_path(make_key(2))
    dst = tmp_path / key_to_path(make_key(1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())  # valid chunk, but it says it is key 2
    assert b.get(make_key(1)) is None
    assert torch.equal(b.get(make_key(2)), chunk(2))
    b.close()


class _Plant:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_planted_pickle_never_executes(tmp_path):
    sentinel = tmp_path / "PWNED"
    store = tmp_path / "store"
    b = disk(store)
    path = store / key_to_path(make_key(3))
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(_Plant(str(sentinel))))
    assert b.get(make_key(3)) is None
    assert b.read_header(make_key(3)) is None
    assert not sentinel.exists()
    b.close()


def test_save_disk_is_atomic_and_readable(tmp_path):
    from lmcache_core import chunk_format

    path = tmp_path / "x.safetensors"
    save_disk(str(path), chunk(4), key="k")
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert torch.equal(chunk_format.decode(path.read_bytes(), "k"), chunk(4))


def test_open_backend_and_create_storage_backend_local(tmp_path):
    with open_backend(str(tmp_path / "a")) as b:
        assert isinstance(b, LMCLocalDiskBackend)
    with open_backend(f"file://{tmp_path}/b") as b:
        assert isinstance(b, LMCLocalDiskBackend) and b.root == str(tmp_path / "b")
    with open_backend("cpu://", max_local_cache_size=0.01) as b:
        assert isinstance(b, LMCLocalBackend)
    from lmcache_core import LMCacheEngineMetadata

    meta = LMCacheEngineMetadata("m", kv_dtype=torch.float16, kv_shape=SHAPE)
    mem = CreateStorageBackend(LMCacheEngineConfig.from_defaults(max_local_cache_size=0.01), meta, "cpu")
    assert isinstance(mem, LMCLocalBackend)
    mem.close()
    dsk = CreateStorageBackend(LMCacheEngineConfig.from_defaults(local_device=f"file://{tmp_path}/c"), meta, "cpu")
    assert isinstance(dsk, LMCLocalDiskBackend)
    dsk.close()
    with pytest.raises(ValueError, match="no tier"):
        CreateStorageBackend(LMCacheEngineConfig.from_defaults(local_device=None), meta, "cpu")


# -- disk batched_get: the caller and one reader thread share the keys --------------------


class TwoThreadGets:
    """Wraps a disk store's ``_get`` (the get ``batched_get`` calls, with its read helper):
    records which thread read which key and with which helper; each thread's first
    get waits until the other thread has begun one (so no test depends on how soon a
    thread gets a core: on a busy machine either thread could otherwise take every
    key before the other runs); one thread's first get can fail, the reader's gets
    can be slow."""

    def __init__(self, store, keys, *, fail: str | None = None, reader_delay: float = 0.0) -> None:
        self.plain_get = store._get
        self.keys = keys
        self.helpers: set[object] = set()
        self.caller = threading.get_ident()
        self.fail = fail
        self.reader_delay = reader_delay
        self.reader_started = threading.Event()
        self.caller_started = threading.Event()
        self.readers: dict[int, int] = {}  # key index -> thread ident
        self.active = 0
        self.lock = threading.Lock()

    def __call__(self, key, helper=None, stream=None):
        me = threading.get_ident()
        mine = me == self.caller
        with self.lock:
            self.helpers.add(helper)
            first = me not in self.readers.values()
            self.readers[self.keys.index(key)] = me
            self.active += 1
        try:
            if first:
                (self.caller_started if mine else self.reader_started).set()
                other = "reader" if mine else "caller"
                started = self.reader_started if mine else self.caller_started
                assert started.wait(10), f"the {other} thread never started a get"
            if not mine:
                time.sleep(self.reader_delay)
            if first and self.fail == ("caller" if mine else "reader"):
                raise RuntimeError("injected failure")
            return self.plain_get(key, helper, stream=stream)
        finally:
            with self.lock:
                self.active -= 1


def test_disk_batched_get_shares_keys_between_two_threads_and_keeps_order(tmp_path, monkeypatch):
    store = disk(tmp_path)
    keys = [make_key(f"bg{i}") for i in range(12)]
    for i, k in enumerate(keys):
        if i % 4 != 3:  # every fourth key is a miss
            store.put(k, chunk(i))
    path = store._path(keys[5])
    with open(path, "r+b") as f:  # and one chunk is corrupt
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    gets = TwoThreadGets(store, keys)
    monkeypatch.setattr(store, "_get", gets)
    got = store.batched_get(keys)
    assert len(set(gets.readers.values())) == 2
    assert gets.helpers == {chunk_format.ALONE}  # two chunks at a time, neither split further
    assert sorted(gets.readers) == list(range(len(keys)))  # each key read once
    for i, g in enumerate(got):
        if i % 4 == 3 or i == 5:
            assert g is None
        else:
            assert torch.equal(g, chunk(i))
    assert store.stats["corrupt"] == 1
    store.close()


@pytest.mark.parametrize("failing", ["caller", "reader"])
def test_disk_batched_get_raises_a_failure_once_the_other_thread_stopped(tmp_path, monkeypatch, failing):
    store = disk(tmp_path)
    keys = [make_key(f"be{i}") for i in range(20)]
    for i, k in enumerate(keys):
        store.put(k, chunk(i))
    # When the caller fails, the reader is 50 ms into a get: the call must wait for it.
    gets = TwoThreadGets(store, keys, fail=failing, reader_delay=0.05 if failing == "caller" else 0.0)
    monkeypatch.setattr(store, "_get", gets)
    with pytest.raises(RuntimeError, match="injected failure"):
        store.batched_get(keys)
    assert gets.active == 0, "a get was still running when batched_get raised"
    if failing == "caller":  # (a fast caller may finish every key before a failed reader says so)
        assert len(gets.readers) < len(keys)  # the rest were not read after the failure
    store.close()


def test_disk_batched_get_after_close_reads_on_the_calling_thread(tmp_path):
    store = disk(tmp_path)
    keys = [make_key(f"bc{i}") for i in range(3)]
    for i, k in enumerate(keys):
        store.put(k, chunk(i))
    store.batched_get(keys)  # the reader pool exists
    store.close()
    got = store.batched_get(keys)  # its pool is shut down: no RuntimeError from submit
    assert all(torch.equal(g, chunk(i)) for i, g in enumerate(got))


def test_disk_batched_get_refuses_a_bad_key_before_reading(tmp_path, monkeypatch):
    store = disk(tmp_path)
    store.put(make_key("ok"), chunk(0))
    reads: list[object] = []
    monkeypatch.setattr(store, "get", lambda key: reads.append(key))
    monkeypatch.setattr(store, "_get", lambda key, helper=None, stream=None: reads.append(key))
    with pytest.raises((TypeError, ValueError)):
        store.batched_get([make_key("ok"), "../../etc/passwd"])  # type: ignore[list-item]
    assert reads == []
    store.close()
