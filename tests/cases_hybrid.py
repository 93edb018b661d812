"""Every tier combination CreateStorageBackend builds from config, for the
conformance suite: the way a serving node builds its store. Remote tiers use
the real Redis and S3 test servers (and fsspec memory:// for one case)."""

from __future__ import annotations

import hashlib
from typing import Callable

from lmcache_core import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend import CreateStorageBackend
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from tests.backend_cases import BackendCase, CaseContext

META = LMCacheEngineMetadata(model_name="test/model")


def _tag(ctx: CaseContext) -> str:
    # Unique per test, stable within it (a second make() reopens the same remote).
    return "hy-" + hashlib.sha256(str(ctx.tmp_path).encode()).hexdigest()[:12]


def _remote_url(ctx: CaseContext, kind: str) -> str:
    if kind == "redis":
        return f"{ctx.fixture('redis_server').url}?prefix={_tag(ctx)}:"
    if kind == "s3":
        s3 = ctx.fixture("s3_server")
        return f"s3://{s3.bucket}/{_tag(ctx)}?endpoint_url={s3.endpoint_url}"
    return f"memory://{_tag(ctx)}"


def _make(
    memory: bool, disk: bool, remote: str | None, pipelined: bool = False
) -> Callable[[CaseContext, float], LMCBackendInterface]:
    def make(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
        fields: dict[str, object] = {
            "local_device": "cpu" if memory else None,
            "max_local_cache_size": budget_gb,
            "pipelined_backend": pipelined,
            "remote_timeout": 5.0,
        }
        if disk:
            fields["local_disk"] = str(ctx.tmp_path / "hybrid-disk")
            fields["max_local_disk_size"] = budget_gb
        if remote is not None:
            fields["remote_url"] = _remote_url(ctx, remote)
        return CreateStorageBackend(LMCacheEngineConfig.from_defaults(**fields), META, "cpu")

    return make


HYBRID_CASES = [
    BackendCase("cfg-memory", _make(True, False, None), stores_bytes=False),
    BackendCase("cfg-disk", _make(False, True, None), persistent=True),
    BackendCase("cfg-remote-redis-pipelined", _make(False, False, "redis", True), evicts=False, persistent=True),
    BackendCase("cfg-memory+redis", _make(True, False, "redis"), evicts=False, persistent=True),
    BackendCase("cfg-disk+s3-pipelined", _make(False, True, "s3", True), evicts=False, persistent=True),
    BackendCase("cfg-memory+disk", _make(True, True, None), persistent=True),
    BackendCase("cfg-memory+disk+redis", _make(True, True, "redis"), evicts=False, persistent=True),
    BackendCase("cfg-memory+fsspec-memory-pipelined", _make(True, False, "memory", True), evicts=False, persistent=True),
]
