"""Device names: validated when configured, a bare "cuda" pinned to the configuring thread's GPU."""

from __future__ import annotations

import threading

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, chunk_format
from lmcache_core.storage_backend.devices import resolve_device
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend
from lmcache_core.storage_backend.mem_pool import BufferPool
from tests.conftest import make_key

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_names_resolve_to_the_device_cpu_tensors_report():
    # torch.device("cpu:0") != torch.device("cpu"), and tensors say "cpu": a pool made
    # with "cpu:0" would never match its own buffers' device.
    for name in ("cpu", "cpu:0", torch.device("cpu")):
        assert resolve_device(name) == torch.empty(1).device


@pytest.mark.parametrize("name", ["mps", "meta", "xla", "not a device", "cuda:x", ""])
def test_other_devices_and_garbage_are_value_errors(name):
    with pytest.raises(ValueError, match="dst_device"):
        resolve_device(name)


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="local_device"):
        resolve_device("mps", "local_device")


def test_cuda_without_cuda_is_refused_at_configuration_not_on_first_get(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="local_device"):
        LMCLocalBackend(LMCacheEngineConfig.from_defaults(local_device="cuda"), None, "cpu")
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path))
    backend = LMCLocalDiskBackend(cfg, None, "cpu")
    try:
        with pytest.raises(ValueError, match="no CUDA device"):
            backend.dst_device = "cuda:1"
        assert backend.dst_device == "cpu"  # unchanged by the refused assignment
    finally:
        backend.close()


@needs_cuda
def test_a_bare_cuda_is_the_configuring_threads_gpu_on_every_thread():
    current = torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda") == current
    backend = LMCLocalBackend(LMCacheEngineConfig.from_defaults(), None, "cuda")
    try:
        backend.put(make_key(1), torch.ones(4, 4))
        got: list[torch.Tensor | None] = []
        # A thread the caller did not set a device on: its current device is GPU 0,
        # which is where an unresolved "cuda" would put the tensor.
        t = threading.Thread(target=lambda: got.append(backend.get(make_key(1))))
        t.start()
        t.join()
        assert got[0] is not None and got[0].device == current
    finally:
        backend.close()


@needs_cuda
def test_a_gpu_index_past_the_last_gpu_is_refused():
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@needs_cuda
def test_a_gpu_memory_tier_hands_freed_slots_back_to_its_pool():
    # The pool's device must compare equal to its buffers' (cuda:N, not "cuda"), or
    # eviction never hints at free slots and puts allocate outside the budget.
    pool = BufferPool("cuda", max_bytes=1 << 20)
    assert pool.acquire(1024).device == pool.device


def test_a_strided_chunk_is_made_contiguous_once_per_disk_put(tmp_path, monkeypatch):
    """Sizing, budget checks and the write share one host copy of the payload.

    A GPU chunk (or a strided one, as here) is copied by every ``payload_view``: a
    32 MiB disk put of a GPU chunk made three to four device-to-host copies.
    """
    calls = []
    real = chunk_format.payload_view

    def counting(tensor):
        calls.append(tensor)
        return real(tensor)

    monkeypatch.setattr(chunk_format, "payload_view", counting)
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path))
    backend = LMCLocalDiskBackend(cfg, None, "cpu")
    try:
        for mib in (1, 8):  # below and above chunk_format.OVERLAP_MIN_BYTES (4 MiB)
            strided = torch.randn(1024, 8, mib * 64).half().transpose(0, 1)
            assert not strided.is_contiguous()
            calls.clear()
            backend.put(make_key(mib), strided)
            assert len(calls) == 1
            got = backend.get(make_key(mib))
            assert got is not None and torch.equal(got, strided)
    finally:
        backend.close()


# -- CUDA streams: the library's threads work on the default stream --------------------------


def test_stream_helpers_leave_cpu_tensors_and_cuda_alone():
    from lmcache_core.storage_backend import devices

    t = torch.ones(4)
    devices.for_library_threads(t)
    assert devices.finished(t) is t and devices.used_on(t, None) is t
    assert devices.caller_stream(torch.device("cpu")) is None
    assert not torch.cuda.is_initialized()  # nothing here may start CUDA for CPU tensors


def _side_stream_stores(tmp_path):
    from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend

    def cfg(**kw):
        return LMCacheEngineConfig.from_defaults(max_local_cache_size=0.1, max_local_disk_size=0.1, **kw)

    return {
        "memory on cuda": LMCLocalBackend(cfg(local_device="cuda"), None, "cuda"),
        "disk": LMCLocalDiskBackend(cfg(local_device=None, local_disk=str(tmp_path / "d")), None, "cuda"),
        "hybrid cuda memory + disk": LMCHybridBackend(
            cfg(local_device="cuda", local_disk=str(tmp_path / "h")), None, dst_device="cuda"
        ),
        "hybrid cpu memory + disk": LMCHybridBackend(
            cfg(local_device="cpu", local_disk=str(tmp_path / "hc")), None, dst_device="cuda"
        ),
    }


@needs_cuda
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "non-blocking"])
def test_a_chunk_made_on_a_side_stream_is_stored_as_made(tmp_path, blocking):
    """The caller's stream is still writing the chunk when put returns to it: a library
    thread that read it on the default stream without waiting stored the zeros from
    before, under a valid checksum (LMCache stores from side streams)."""
    want = torch.arange(1 << 18, dtype=torch.float32, device="cuda").reshape(4, 2, 64, 8, 64)
    side = torch.cuda.Stream()
    for name, store in _side_stream_stores(tmp_path).items():
        try:
            with torch.cuda.stream(side):
                made = torch.zeros_like(want)
                torch.cuda._sleep(100_000_000)  # tens of ms of GPU time before the copy lands
                made.copy_(want)
                store.put(make_key(name), made, blocking=blocking)
                got = store.get(make_key(name))
                batch = store.batched_get([make_key(name), make_key(name)])
            side.synchronize()
            assert got is not None and torch.equal(got, want), name
            assert all(b is not None and torch.equal(b, want) for b in batch), name
        finally:
            store.close()


@needs_cuda
def test_a_hybrid_put_of_a_gpu_chunk_crosses_to_the_host_once(tmp_path, monkeypatch):
    """The disk and remote tiers each copied a GPU chunk to the host themselves."""
    from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend

    cuda_views = []
    real = chunk_format.payload_view

    def counting(tensor):
        if tensor.is_cuda:
            cuda_views.append(tensor)
        return real(tensor)

    monkeypatch.setattr(chunk_format, "payload_view", counting)
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu", local_disk=str(tmp_path), remote_url=f"fsspec+file://{tmp_path / 'remote'}"
    )
    store = LMCHybridBackend(cfg, None, dst_device="cuda")
    try:
        chunk = torch.randn(4, 2, 64, 8, 64, device="cuda")
        store.put(make_key("once"), chunk)
        assert cuda_views == []
        got = store.get(make_key("once"))
        assert got is not None and torch.equal(got, chunk)
    finally:
        store.close()


@needs_cuda
def test_a_non_blocking_hybrid_put_from_a_gpu_tier_leaves_the_host_copy_to_the_writer(tmp_path, monkeypatch):
    """With a GPU memory tier and a remote, a queued put returns at once: the remote's
    writer copies the tier's slot to the host, not the caller (a blocking put does)."""
    from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend

    made = []
    real = LMCHybridBackend._host_copy

    def recording(self, kv_chunk, blocking):
        made.append(real(self, kv_chunk, blocking))
        return made[-1]

    monkeypatch.setattr(LMCHybridBackend, "_host_copy", recording)
    cfg = LMCacheEngineConfig.from_defaults(local_device="cuda", remote_url=f"fsspec+file://{tmp_path}")
    store = LMCHybridBackend(cfg, None, dst_device="cuda")
    try:
        chunk = torch.randn(4, 2, 64, 8, 64, device="cuda")
        store.put(make_key("nb"), chunk, blocking=False)
        store.put(make_key("b"), chunk, blocking=True)
        assert made[0] is None and made[1] is not None and made[1].device.type == "cpu"
    finally:
        store.close()
    reader = LMCHybridBackend(cfg, None, dst_device="cuda")
    try:
        got = reader.remote.get(make_key("nb"))
        assert got is not None and torch.equal(got, chunk)
    finally:
        reader.close()
