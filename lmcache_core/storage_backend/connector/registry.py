"""URL scheme -> remote connector class, imported only when first used.

Like fsspec's registry: a sorted table of ``"module:Class"`` strings plus the
``pip install`` hint to show when the class's optional dependency is missing,
so importing lmcache_core never imports redis or s3fs. Schemes not in the table
that fsspec knows (``gs``, ``az``, ``abfs``, ``hdfs``, ...) go to the fsspec
connector; ``fsspec+<protocol>://`` forces it (``fsspec+file://`` is a local
directory used *as a remote*, where plain ``file://`` means the disk tier to
``open_backend``). Pure lookups; thread-safe.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from lmcache_core.config import check_remote_url, mask_url
from lmcache_core.storage_backend.connector.base import RemoteConnector

FSSPEC_CONNECTOR = "lmcache_core.storage_backend.connector.fsspec_connector:FsspecConnector"
REDIS_CONNECTOR = "lmcache_core.storage_backend.connector.redis_connector:RedisConnector"
REDIS_HINT = "pip install 'lmcache-toolkit[redis]'"
S3_HINT = "pip install 'lmcache-toolkit[s3]'"
FSSPEC_PREFIX = "fsspec+"


@dataclass(frozen=True)
class ConnectorSpec:
    """Where a scheme's connector lives and what to install when it cannot load."""

    target: str  # "package.module:Class"
    install_hint: str | None = None


# Sorted by scheme, as fsspec keeps its table: easy to scan in review.
CONNECTORS: dict[str, ConnectorSpec] = {
    "file": ConnectorSpec(FSSPEC_CONNECTOR),
    "memory": ConnectorSpec(FSSPEC_CONNECTOR),
    "redis": ConnectorSpec(REDIS_CONNECTOR, REDIS_HINT),
    "redis+cluster": ConnectorSpec(REDIS_CONNECTOR, REDIS_HINT),
    "rediss": ConnectorSpec(REDIS_CONNECTOR, REDIS_HINT),
    "rediss+cluster": ConnectorSpec(REDIS_CONNECTOR, REDIS_HINT),
    "s3": ConnectorSpec(FSSPEC_CONNECTOR, S3_HINT),
    "s3a": ConnectorSpec(FSSPEC_CONNECTOR, S3_HINT),
    "unix": ConnectorSpec(REDIS_CONNECTOR, REDIS_HINT),
}


def scheme_of(url: str) -> str:
    """The lower-cased URL scheme; ``ValueError`` when there is none."""
    if not isinstance(url, str):
        raise ValueError(f"remote URL must be a string like scheme://..., got {type(url).__name__}")
    if "://" not in url:
        # Masked before it is cut: "admin:pw@cache:6379/0" (the scheme forgotten) holds a password.
        raise ValueError(f"remote URL must look like scheme://..., got {mask_url(url)!r:.80}")
    return urlsplit(url).scheme.lower() or url.split("://", 1)[0].lower()


def _fsspec_protocols() -> dict[str, dict[str, str]]:
    from fsspec.registry import known_implementations, registry

    known = {name: dict(spec) for name, spec in known_implementations.items()}
    for name in registry:  # implementations registered at run time by plugins
        known.setdefault(name, {})
    return known


def spec_for(url: str) -> ConnectorSpec:
    """The connector spec for ``url``'s scheme.

    Raises:
        ValueError: the scheme is unknown to this table and to fsspec.
    """
    scheme = scheme_of(url)
    if scheme in CONNECTORS:
        return CONNECTORS[scheme]
    protocol = scheme.removeprefix(FSSPEC_PREFIX)
    fsspec_known = _fsspec_protocols()
    if protocol in fsspec_known:
        hint = CONNECTORS[protocol].install_hint if protocol in CONNECTORS else None
        return ConnectorSpec(FSSPEC_CONNECTOR, hint or fsspec_known[protocol].get("err"))
    raise ValueError(
        f"unknown remote URL scheme {scheme!r}; known: {', '.join(known_schemes())}, "
        f"any other fsspec protocol ({', '.join(sorted(p for p in fsspec_known if p not in CONNECTORS)[:12])}, ...) "
        f"or fsspec+<protocol>://"
    )


def known_schemes() -> list[str]:
    """The schemes of the table (fsspec protocols are accepted as well)."""
    return sorted(CONNECTORS)


def load_connector_class(spec: ConnectorSpec, scheme: str) -> Callable[..., RemoteConnector]:
    """Import ``spec.target`` lazily.

    Raises:
        ImportError: the connector or its optional dependency is missing; the
            message says what to install.
    """
    module_name, _, class_name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing == module_name:  # our own module is absent: a packaging bug, not a user's
            raise ImportError(f"{scheme}:// connector module {module_name} is not installed") from exc
        hint = spec.install_hint or f"install the package that provides {missing or 'it'}"
        raise ImportError(
            f"{scheme}:// needs the optional dependency {missing or exc}: {hint}"
        ) from exc
    cls: Callable[..., RemoteConnector] = getattr(module, class_name)
    return cls


def connector_for(url: str, *, timeout: float, **options: Any) -> RemoteConnector:
    """Open the connector for ``url``.

    Args:
        url: ``redis://``, ``s3://bucket/prefix``, ``memory://name``, ...
        timeout: seconds each remote operation may take (the client's own
            connect/read timeouts; the backend adds a hard bound on top).
        **options: passed to the connector (e.g. S3 ``endpoint_url``).

    Raises:
        ValueError: unknown scheme or bad URL/options; a ``ConfigError`` for an S3 or
            GCS URL with ``user:pw@`` in it (``config.check_remote_url``), however the
            URL reached here.
        ImportError: the scheme's optional dependency is missing (says what to install).
    """
    check_remote_url(url)
    spec = spec_for(url)
    cls = load_connector_class(spec, scheme_of(url))
    try:
        return cls(url, timeout=timeout, **options)
    except ImportError as exc:
        # fsspec imports a protocol's package (s3fs, gcsfs, adlfs) only now.
        hint = spec.install_hint
        if hint and hint not in str(exc):
            raise ImportError(f"{scheme_of(url)}:// needs an optional dependency ({exc}): {hint}") from exc
        raise
