"""``put_blocking`` and ``put_nonblocking`` are public seed methods: they check what ``put`` checks.

Regressions from an audit of the remote tier: the remote's ``put_nonblocking``
took a closed backend's write without a word (never stored), took a non-tensor
(``contains`` said True, the writer then failed), and in a forked child queued to
the parent's writer threads, which the child does not have. And a
``put(blocking=False)`` racing ``close()`` could queue behind the writers' end
signals: acknowledged, never stored, counted nowhere.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend
from tests.conftest import make_key
from tests.test_last_write_budget_fills_and_fork import run_in_child

Opener = Callable[[], LMCBackendInterface]


def _memory(tmp_path: Path) -> Opener:
    return lambda: LMCLocalBackend(LMCacheEngineConfig(max_local_cache_size=0.05), None, "cpu")


def _disk(tmp_path: Path) -> Opener:
    cfg = LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path / "disk"), max_local_disk_size=0.05)
    return lambda: LMCLocalDiskBackend(cfg, None, "cpu")


def _remote(tmp_path: Path) -> Opener:
    # A local directory: it outlives the backend, so a fresh one can check what landed.
    cfg = LMCacheEngineConfig(local_device=None, remote_url=f"fsspec+file://{tmp_path / 'remote'}", remote_timeout=5.0)
    return lambda: LMCRemoteBackend(cfg, None, "cpu")


@pytest.fixture(params=[_memory, _disk, _remote], ids=["memory", "disk", "remote"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    return request.param(tmp_path)  # type: ignore[no-any-return]


def chunk(v: float = 1.0) -> torch.Tensor:
    return torch.full((1, 2, 4, 2, 8), v)


METHODS = ["put_blocking", "put_nonblocking"]


@pytest.mark.parametrize("method", METHODS)
def test_bad_arguments_raise_at_once(opener: Opener, method: str) -> None:
    store = opener()
    put: Any = getattr(store, method)
    with pytest.raises(TypeError):
        put("not a key", chunk())
    with pytest.raises(TypeError):
        put(make_key("k"), "not a tensor")
    with pytest.raises(TypeError):
        put(make_key("k"), [1.0, 2.0])
    assert not store.contains(make_key("k"))
    store.close()


@pytest.mark.parametrize("method", METHODS)
def test_a_closed_backend_refuses_the_write(opener: Opener, method: str) -> None:
    store = opener()
    store.put(make_key("before"), chunk())
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        getattr(store, method)(make_key("after"), chunk())
    fresh = opener()
    if not isinstance(fresh, LMCLocalBackend):  # memory does not outlive its backend
        assert fresh.contains(make_key("before"))
    assert not fresh.contains(make_key("after"))
    fresh.close()


def test_a_non_blocking_put_racing_close_is_stored_or_refused(opener: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() runs, to the end, between the put's checks and its queueing (the race,
    made certain): the put must raise, not be acknowledged and lost."""
    store = opener()
    real: Any = store._check_put  # type: ignore[attr-defined]

    def checked_then_closed(key: CacheEngineKey, kv_chunk: torch.Tensor) -> None:
        real(key, kv_chunk)
        closer = threading.Thread(target=store.close)
        closer.start()
        closer.join(10)
        assert not closer.is_alive()

    monkeypatch.setattr(store, "_check_put", checked_then_closed)
    key = make_key(f"race-{uuid.uuid4().hex[:8]}")
    with pytest.raises(RuntimeError, match="closed"):
        store.put(key, chunk(), blocking=False)
    fresh = opener()
    assert not fresh.contains(key)
    fresh.close()


def test_a_forked_childs_first_call_put_nonblocking_is_stored(tmp_path: Path) -> None:
    """The child's first use is ``put_nonblocking`` itself: it must start the child's own
    writers, and ``close()`` drain them."""
    open_remote = _remote(tmp_path)
    parent = open_remote()
    parent.put(make_key("parent"), chunk(1.0))
    key = make_key("child")

    def child() -> None:
        assert isinstance(parent, LMCRemoteBackend)
        parent.put_nonblocking(key, chunk(3.0))
        parent.close()
        with open_remote() as fresh:
            got = fresh.get(key)
            assert got is not None and torch.equal(got, chunk(3.0))

    assert run_in_child(child) == 0
    parent.close()
    with open_remote() as fresh:
        assert fresh.contains(key)


@pytest.mark.parametrize("shape", ["remote", "hybrid"])
def test_a_forked_child_closes_a_remote_whose_lock_a_parent_thread_held(tmp_path: Path, shape: str) -> None:
    """close() took the remote's lock before it saw it was in a child: a lock a parent
    thread held at fork() is never released there, and the child's close() hung."""
    from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend

    if shape == "remote":
        store: Any = _remote(tmp_path)()
        remote = store
    else:
        cfg = LMCacheEngineConfig(
            local_device="cpu", remote_url=f"fsspec+file://{tmp_path / 'remote'}", remote_timeout=5.0
        )
        store = LMCHybridBackend(cfg, None, None, "cpu")
        remote = store.remote
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with remote._lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert held.wait(10)
    try:
        assert run_in_child(store.close) == 0  # run_in_child fails the test if the child hangs
    finally:
        release.set()
        holder.join()
    store.close()
