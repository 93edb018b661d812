"""Hybrid (tiered) backends for the conformance suite, built by CreateStorageBackend
from config, the way a serving node builds them."""

from __future__ import annotations

from lmcache_core import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend import CreateStorageBackend
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from tests.backend_cases import BackendCase, CaseContext

META = LMCacheEngineMetadata(model_name="test/model")


def _remote_url(ctx: CaseContext, kind: str) -> str:
    tag = ctx.tmp_path.name
    if kind == "redis":
        return f"{ctx.fixture('redis_server').url}?prefix=hy-{tag}:"
    if kind == "s3":
        s3 = ctx.fixture("s3_server")
        return f"s3://{s3.bucket}/hy-{tag}"
    return f"memory://hybrid-{tag}"


def _s3_options(ctx: CaseContext, kind: str) -> dict[str, object]:
    return {}


def _make(memory: bool, disk: bool, remote: str | None, pipelined: bool = False):
    def make(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
        fields: dict[str, object] = {
            "local_device": "cpu" if memory else None,
            "max_local_cache_size": budget_gb,
            "pipelined_backend": pipelined,
        }
        if disk:
            fields["local_disk"] = str(ctx.tmp_path / "hybrid-disk")
            fields["max_local_disk_size"] = budget_gb
        if remote is not None:
            fields["remote_url"] = _remote_url(ctx, remote)
            if remote == "s3":
                fields["remote_url"] += "?endpoint_url=" + ctx.fixture("s3_server").endpoint_url
        return CreateStorageBackend(LMCacheEngineConfig.from_defaults(**fields), META, "cpu")

    return make


HYBRID_CASES = [
    BackendCase("hybrid-memory+disk", _make(True, True, None), persistent=True),
]
