"""fsspec remote cases for the conformance suite: S3 (moto), memory://, file://.

Each runs plain and pipelined. Every test gets its own prefix, derived from its
tmp_path: unique per test, the same for a second ``make()`` in that test, so
persistent cases reopen the same store. The prefix is a hash because test ids
hold ``[`` and ``]``, which fsspec would read as glob patterns.
"""

from __future__ import annotations

import hashlib
from typing import Any

from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from tests.backend_cases import BackendCase, CaseContext

TIMEOUT = 5.0


def store_prefix(ctx: CaseContext) -> str:
    """A short prefix that is unique per test and stable within it."""
    return "lmc-" + hashlib.sha256(str(ctx.tmp_path).encode()).hexdigest()[:16]


def _remote(url: str, pipelined: bool, **options: Any) -> LMCBackendInterface:
    from lmcache_core.storage_backend.remote_backend import (
        LMCPipelinedRemoteBackend,
        LMCRemoteBackend,
    )

    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=TIMEOUT)
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    return cls(cfg, None, "cpu", **options)


def _s3(pipelined: bool):  # type: ignore[no-untyped-def]
    def make(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
        server = ctx.fixture("s3_server")
        return _remote(server.url(store_prefix(ctx)), pipelined, **server.options)

    return make


def _memory(pipelined: bool):  # type: ignore[no-untyped-def]
    def make(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
        return _remote(f"memory://{store_prefix(ctx)}", pipelined)

    return make


def _file_from_config(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
    # The path LMCache users take: remote_url=file://... in the config goes to
    # the fsspec connector (a local directory used as a shared remote).
    from lmcache_core.storage_backend import CreateStorageBackend

    cfg = LMCacheEngineConfig(
        local_device=None, remote_url=f"file://{ctx.tmp_path / 'remote'}", remote_timeout=TIMEOUT
    )
    return CreateStorageBackend(cfg, LMCacheEngineMetadata(model_name="test/model"), "cpu")


def _file_pipelined_from_url(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
    # The CLI's path: open_backend() with the explicit fsspec+file:// scheme
    # (plain file:// there means the disk tier).
    from lmcache_core.storage_backend import open_backend

    return open_backend(
        f"fsspec+file://{ctx.tmp_path / 'remote'}", pipelined=True, remote_timeout=TIMEOUT
    )


FSSPEC_CASES: list[BackendCase] = [
    BackendCase("s3", _s3(False), evicts=False, persistent=True),
    BackendCase("s3-pipelined", _s3(True), evicts=False, persistent=True),
    BackendCase("fsspec-memory", _memory(False), evicts=False, persistent=True),
    BackendCase("fsspec-memory-pipelined", _memory(True), evicts=False, persistent=True),
    BackendCase("fsspec-file", _file_from_config, evicts=False, persistent=True),
    BackendCase("fsspec-file-pipelined", _file_pipelined_from_url, evicts=False, persistent=True),
]
