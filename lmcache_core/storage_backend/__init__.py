"""Storage backends: build one from a config (``CreateStorageBackend``) or a URL
(``open_backend``).

``open_backend`` URLs: ``/path``, ``./path`` or ``file:///path`` -> disk tier;
``cpu://`` or ``cuda://`` -> memory tier; ``redis://``, ``rediss://``, ``unix://``,
``redis+cluster://``, ``s3://``, ``gs://``, ``az://``, ``memory://``, ``fsspec+file://``
and any other fsspec protocol -> remote tier. A mistyped URL (``s3:/bucket``,
``redis:/u:pw@h``, ``file:/abs``, ``cache:6379``) is refused, not made a directory
under the working directory (``config.check_store_path``).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit

from lmcache_core.config import (
    LMCacheEngineConfig,
    LMCacheEngineMetadata,
    LMCacheMemPoolMetadata,
    store_kind,
)
from lmcache_core.errors import ConfigError
from lmcache_core.storage_backend.abstract_backend import ChunkInfo, LMCBackendInterface

__all__ = [
    "ChunkInfo",
    "CreateStorageBackend",
    "LMCBackendInterface",
    "open_backend",
    "store_kind",
]

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(LMCacheEngineConfig)} - {"sources"}


def open_backend(
    url: str,
    *,
    dst_device: str = "cpu",
    config: LMCacheEngineConfig | None = None,
    metadata: LMCacheEngineMetadata | LMCacheMemPoolMetadata | None = None,
    **options: Any,
) -> LMCBackendInterface:
    """Open the store named by ``url``.

    Args:
        url: see the module docstring.
        dst_device: where ``get`` puts tensors.
        config: base configuration (defaults when None).
        metadata: optional chunk shape/dtype (enables the memory slot pool).
        **options: config field overrides (e.g. ``max_local_disk_size=10``), then
            backend options (e.g. ``fsync=True``, ``pipelined=True``, S3
            ``endpoint_url=...``).

    Raises:
        ValueError: an unknown scheme or bad options.
        ConfigError: (a ``ValueError``) a mistyped URL such as ``s3:/bucket`` or
            ``redis:/u:pw@h`` (shown masked, saying what a URL and a directory look
            like), a ``file://`` naming no directory, a bad config field.
        ImportError: the scheme's optional dependency is missing.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("store URL must be a non-empty string")
    cfg_overrides = {k: v for k, v in options.items() if k in _CONFIG_FIELDS}
    extra = {k: v for k, v in options.items() if k not in _CONFIG_FIELDS}
    base = config or LMCacheEngineConfig()
    kind = store_kind(url)
    if kind == "disk":
        from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

        path = url[len("file://") :] if url.startswith("file://") else url
        cfg = base.replace(local_device=None, local_disk=path, remote_url=None, **cfg_overrides)
        return LMCLocalDiskBackend(cfg, metadata, dst_device, **extra)
    if kind == "memory":
        from lmcache_core.storage_backend.local_backend import LMCLocalBackend

        parts = urlsplit(url)
        device = parts.scheme + (f":{parts.netloc}" if parts.netloc else "")
        cfg = base.replace(local_device=device, local_disk=None, remote_url=None, **cfg_overrides)
        if extra:
            raise ValueError(f"unknown options for a memory store: {', '.join(sorted(extra))}")
        return LMCLocalBackend(cfg, metadata, dst_device)
    from lmcache_core.storage_backend.remote_backend import (
        LMCPipelinedRemoteBackend,
        LMCRemoteBackend,
    )

    pipelined = bool(extra.pop("pipelined", base.pipelined_backend))
    cfg = base.replace(remote_url=url, **cfg_overrides)
    engine_meta = metadata if isinstance(metadata, LMCacheEngineMetadata) else None
    cls = LMCPipelinedRemoteBackend if pipelined else LMCRemoteBackend
    return cls(cfg, engine_meta, dst_device, **extra)  # type: ignore[arg-type]


def CreateStorageBackend(  # noqa: N802 - LMCache's public name
    config: LMCacheEngineConfig,
    metadata: LMCacheEngineMetadata,
    dst_device: str = "cuda",
) -> LMCBackendInterface:
    """Build the backend a config describes, as LMCache does.

    memory only, disk only, remote only, or local tier(s) in front of a remote
    (``LMCHybridBackend``). Absent fields switch a tier off; nothing connects
    anywhere unless configured.

    Raises:
        ConfigError: no tier configured, or conflicting fields.
    """
    memory = config.local_memory_device is not None
    disk = config.disk_path is not None
    remote = config.remote_url is not None
    if config.local_disk and config.local_device and config.local_device.startswith("file://"):
        raise ConfigError(
            "local_disk", "set either local_disk or local_device=file://<dir>, not both"
        )
    if not (memory or disk or remote):
        raise ConfigError(
            "local_device",
            "no tier configured: set local_device (cpu, cuda, file://<dir>), local_disk or remote_url",
        )
    mpool = _mpool_metadata(config, metadata)
    if memory and not disk and not remote:
        from lmcache_core.storage_backend.local_backend import LMCLocalBackend

        return LMCLocalBackend(config, mpool, dst_device)
    if disk and not memory and not remote:
        from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

        return LMCLocalDiskBackend(config, mpool, dst_device)
    if remote and not memory and not disk:
        from lmcache_core.storage_backend.remote_backend import (
            LMCPipelinedRemoteBackend,
            LMCRemoteBackend,
        )

        cls = LMCPipelinedRemoteBackend if config.pipelined_backend else LMCRemoteBackend
        return cls(config, metadata, dst_device)
    from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend

    return LMCHybridBackend(config, metadata, mpool, dst_device)


def _mpool_metadata(
    config: LMCacheEngineConfig, metadata: LMCacheEngineMetadata | None
) -> LMCacheMemPoolMetadata | None:
    if metadata is None or metadata.kv_shape is None or metadata.kv_dtype is None:
        return None
    return LMCacheMemPoolMetadata(metadata.kv_shape, metadata.kv_dtype, config.max_local_cache_size)
