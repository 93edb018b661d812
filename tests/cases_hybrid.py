"""Every tier combination CreateStorageBackend builds from config, for the
conformance suite: the way a serving node builds its store. Remote tiers use
the real Redis and S3 test servers (and fsspec memory:// for one case)."""

from __future__ import annotations

import hashlib
from typing import Callable

import yaml

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


def _config(fields: dict[str, object], source: str, ctx: CaseContext) -> LMCacheEngineConfig:
    """The config as a serving node gets it: from an LMCache YAML file or from LMCACHE_* variables."""
    if source == "yaml":
        path = ctx.tmp_path / "lmcache-config.yaml"
        path.write_text(yaml.safe_dump(fields))
        return LMCacheEngineConfig.from_file(path)
    # Environment strings: '' means "not set" (None); a mapping keeps os.environ untouched.
    env = {f"LMCACHE_{k.upper()}": "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in fields.items()}
    return LMCacheEngineConfig.from_env(env)


def _make(
    memory: bool, disk: bool, remote: str | None, pipelined: bool = False, source: str = "yaml"
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
        return CreateStorageBackend(_config(fields, source, ctx), META, "cpu")

    return make


# Every combination from a YAML file ("yaml-") and from LMCACHE_* variables ("env-").
_COMBOS: list[tuple[str, tuple[bool, bool, str | None, bool], dict[str, bool]]] = [
    ("memory", (True, False, None, False), {"stores_bytes": False}),
    ("disk", (False, True, None, False), {"persistent": True}),
    ("remote-redis-pipelined", (False, False, "redis", True), {"evicts": False, "persistent": True}),
    ("memory+redis", (True, False, "redis", False), {"evicts": False, "persistent": True}),
    ("disk+s3-pipelined", (False, True, "s3", True), {"evicts": False, "persistent": True}),
    ("memory+disk", (True, True, None, False), {"persistent": True}),
    ("memory+disk+redis", (True, True, "redis", False), {"evicts": False, "persistent": True}),
    ("memory+fsspec-memory-pipelined", (True, False, "memory", True), {"evicts": False, "persistent": True}),
]

HYBRID_CASES = [
    BackendCase(f"{source}-{name}", _make(*args, source=source), **flags)  # type: ignore[arg-type]
    for name, args, flags in _COMBOS
    for source in ("yaml", "env")
]
