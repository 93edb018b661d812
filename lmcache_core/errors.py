"""The project's few exception types.

Each inherits from the builtin a caller would naturally catch (``ValueError``,
``OSError``, ``ConnectionError``), so code that knows nothing of lmcache still
handles them, and each carries what failed (key, path, store) for the message.
"""

from __future__ import annotations

import errno as _errno


class LMCacheError(Exception):
    """Base class of every error raised on purpose by lmcache_core."""


class ConfigError(LMCacheError, ValueError):
    """A configuration field is unknown or has an invalid value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class CorruptChunkError(LMCacheError, ValueError):
    """Stored bytes are not a valid chunk (bad header, size or checksum).

    Backends never let this reach a ``get`` caller: a corrupt chunk is a miss.
    It surfaces only from the codec and from ``verify``-style tools.
    """

    def __init__(self, reason: str, *, where: str | None = None) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.where = where


class StoreUnavailableError(LMCacheError, ConnectionError):
    """A remote store did not answer in time, refused, or its circuit is open."""

    def __init__(self, store: str, reason: str) -> None:
        super().__init__(f"{store}: {reason}")
        self.store = store
        self.reason = reason


class WriteAbandonedError(StoreUnavailableError):
    """A write whose caller stopped waiting (it timed out) published nothing.

    Raised on the I/O thread that was still sending, never retried: once its
    caller is told, the tensor may change, so the bytes must not be hashed or
    published any more.
    """


class StoreDeniedError(StoreUnavailableError, PermissionError):
    """The server answered and refused: a wrong or missing password, an ACL's
    ``NOPERM``, or a read-only replica's ``READONLY``.

    A ``StoreUnavailableError`` to callers (a read is a miss, a write fails), and a
    ``PermissionError``, which the remote backend takes for an answer: the server is
    up, so it is neither retried nor a strike against the circuit (a user allowed to
    read but not write would otherwise shut off its reads with every refused put).
    """


class StoreFullError(LMCacheError, OSError):
    """The store has no room for the chunk (budget, ENOSPC, Redis maxmemory).

    ``errno`` is ``ENOSPC``, so code that only knows builtins recognises a full store.
    """

    def __init__(self, store: str, reason: str) -> None:
        super().__init__(f"{store}: {reason}")
        self.errno = _errno.ENOSPC
        self.store = store
        self.reason = reason
