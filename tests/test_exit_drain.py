"""Writes queued by ``put(blocking=False)`` are stored when a script exits without
``close()``: the writers are daemon threads, so the interpreter would not wait for
them. Each case runs the writer in a child interpreter against the real server;
Redis is reached through a proxy that delays every packet, so the writers are
always behind when the child's script ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from lmcache_core import LMCacheEngineConfig
from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
from tests.conftest import make_key
from tests.tcp_proxy import TcpProxy

CHUNKS = 24
SHAPE = (64, 2, 16, 8, 32)  # float32: 2 MiB, so the writers are still busy at exit


def _run_child(body: str) -> None:
    child = textwrap.dedent(
        """
        import torch
        from lmcache_core import LMCacheEngineConfig
        from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
        from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
        from tests.conftest import make_key
        """
    ) + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr
    assert "gave up" not in done.stderr and "failed" not in done.stderr, done.stderr


def _assert_all_stored(backend: LMCRemoteBackend) -> None:
    try:
        for i in range(CHUNKS):
            got = backend.get(make_key(i))
            assert got is not None, f"chunk {i} of {CHUNKS}: acknowledged, then lost at exit"
            assert got.shape == SHAPE and bool((got == float(i)).all()), i
    finally:
        backend.close()


@pytest.fixture
def slow_redis_url(redis_server_private: Any) -> Iterator[str]:
    """The redis URL through a proxy that holds each packet 2 ms: a slow network."""
    with TcpProxy(("127.0.0.1", redis_server_private.port), mode="delay", delay=0.002) as proxy:
        yield f"redis://127.0.0.1:{proxy.port}"


def _remote_target(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if kind == "redis":
        return request.getfixturevalue("slow_redis_url"), {}
    server = request.getfixturevalue("s3_server")
    return server.url(f"exit-drain/{tmp_path.name}"), server.options


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
@pytest.mark.parametrize("kind", ["redis", "s3"])
def test_remote_puts_queued_at_exit_are_stored(
    kind: str, pipelined: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url, options = _remote_target(kind, request, tmp_path)
    cls = "LMCPipelinedRemoteBackend" if pipelined else "LMCRemoteBackend"
    _run_child(
        f"""
        b = {cls}(LMCacheEngineConfig(remote_url={url!r}), None, "cpu", put_workers=1, **{options!r})
        for i in range({CHUNKS}):
            b.put(make_key(i), torch.full({SHAPE!r}, float(i)), blocking=False)
        # no close(): the interpreter exits with the puts queued
        """
    )
    reader_cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    _assert_all_stored(reader_cls(LMCacheEngineConfig(remote_url=url), None, "cpu", **options))


def test_hybrid_remote_puts_queued_at_exit_are_stored(slow_redis_url: str) -> None:
    url = slow_redis_url
    _run_child(
        f"""
        cfg = LMCacheEngineConfig(local_device="cpu", remote_url={url!r}, max_local_cache_size=1.0)
        b = LMCHybridBackend(cfg, None, dst_device="cpu")
        for i in range({CHUNKS}):
            b.put(make_key(i), torch.full({SHAPE!r}, float(i)), blocking=False)
        """
    )
    _assert_all_stored(LMCRemoteBackend(LMCacheEngineConfig(remote_url=url), None, "cpu"))


def test_a_closed_remote_is_not_closed_again_at_exit(redis_server_private: Any) -> None:
    """close() takes the backend off the exit list: the hook holds no closed backends."""
    from lmcache_core.storage_backend import write_queue

    backend = LMCRemoteBackend(LMCacheEngineConfig(remote_url=redis_server_private.url), None, "cpu")
    assert backend in write_queue._open_writers
    backend.put(make_key("x"), torch.ones(4, 4), blocking=False)
    backend.close()
    assert backend not in write_queue._open_writers
