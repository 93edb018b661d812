"""The small interface every remote transport implements.

A connector moves chunk *bytes* by key; it knows nothing of tensors, checksums,
timeouts or retries (``LMCRemoteBackend`` adds those once, for every connector).
The exceptions are two optimisations the backend asks for: ``get_hashed`` may
hash a chunk's payload while it arrives (``chunk_format.ArrivingPayload``), and
``put_chunk`` may hash it while it is sent (``chunk_format.UnsealedChunk``).
Each connector maps keys to its own object names (fsspec: ``layout.key_to_path``
under the URL's prefix; Redis: ``<prefix>`` + ``key.to_string()``).

Implementations must be thread-safe and fork-safe (reopen clients in a child).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Sequence

from lmcache_core.chunk_format import UnsealedChunk
from lmcache_core.errors import WriteAbandonedError
from lmcache_core.key import CacheEngineKey

#: The value size a connector assumes until a read shows the real one: full 32 MiB chunks.
ASSUMED_VALUE_BYTES = 32 * 2**20
#: Room one such chunk's object takes in a warm buffer pool: payload plus header (a
#: pool sized as N x 32 MiB keeps only N - 1 of them).
CHUNK_OBJECT_BYTES = ASSUMED_VALUE_BYTES + 64 * 1024


@dataclass(frozen=True)
class RemoteObject:
    """One listed chunk object: its key, size and modification time when known."""

    key: CacheEngineKey
    size: int | None = None
    mtime: float | None = None


class RemoteConnector(abc.ABC):
    """Bytes by key on a remote medium.

    Methods raise ``OSError``/``ConnectionError``/``TimeoutError`` (or the client's
    own exceptions) on transport failure; ``None``/``False`` mean absent.
    """

    #: the URL with secrets masked, safe to print
    display_url: str = ""
    # The largest value of the latest read (``learn_value_sizes``), which sizes batched
    # reads; these class defaults hold until a read sets them on the instance.
    _value_hint: int = ASSUMED_VALUE_BYTES
    _value_learned: bool = False

    @abc.abstractmethod
    def get(self, key: CacheEngineKey) -> bytes | None:
        """The stored bytes, or None when absent.

        Bytes-like: ``bytes``, or a ``memoryview`` over a pooled buffer that the
        caller owns until it drops it (Redis large replies).
        """

    def get_hashed(self, key: CacheEngineKey) -> tuple[bytes | None, str | None]:
        """``get``, and the chunk's payload checksum when it was hashed as the bytes arrived.

        For ``chunk_format.decode(..., digest=...)``. The default hashes nothing
        (None: the backend checks the bytes after); a connector whose reads wait on
        a server can hash while it waits (Redis, ``chunk_format.ArrivingPayload``).
        """
        return self.get(key), None

    def get_many(self, keys: Sequence[CacheEngineKey]) -> list[bytes | None]:
        """Bytes aligned with ``keys``; connectors override with a concurrent fetch."""
        return [self.get(k) for k in keys]

    #: whether ``open_stream`` works (objects are local files)
    streams: bool = False

    def open_stream(self, key: CacheEngineKey) -> BinaryIO | None:
        """The object as an unbuffered binary file (the caller closes it), or None when absent.

        Only where ``streams``: the backend then reads a chunk into warm memory
        and checks it piece by piece instead of decoding ``get``'s bytes.
        """
        raise NotImplementedError

    def learn_value_sizes(self, values: Sequence[Any]) -> None:
        """Note the largest of ``values`` (bytes-like, tensors or None) as the value size.

        Every read calls it; a backend also does for chunks it read past ``get``
        (``open_stream``). The latest read's, so the hint follows the workload both
        ways. Threads race on it harmlessly: it only sizes batches.
        """
        largest = max((_nbytes(v) for v in values if v is not None), default=0)
        if largest:
            self._value_hint = largest
            self._value_learned = True

    def learned_value_bytes(self) -> int | None:
        """The value size the latest read showed; None until a read has shown one."""
        return self._value_hint if self._value_learned else None

    def fetch_group_keys(self) -> int | None:
        """Keys per ``get_many`` a pipelined batch should send, or None to split it evenly.

        A connector whose ``get_many`` is itself concurrent (fsspec) wants few large
        groups; one whose batch is a single reply on one connection (Redis MGET)
        wants small groups spread over connections once values are large.
        """
        return None

    @abc.abstractmethod
    def put(self, key: CacheEngineKey, parts: Sequence[bytes | memoryview]) -> None:
        """Store the concatenation of ``parts`` (header, payload) under ``key``, atomically."""

    def put_chunk(self, key: CacheEngineKey, chunk: UnsealedChunk) -> None:
        """Store an encoded chunk whose checksum is not in its header yet, atomically.

        Default: hash the payload, then ``put``. A connector that can publish an
        object after writing it (Redis) overrides this to hash as it sends.

        Raises:
            WriteAbandonedError: the caller gave up (timed out) before the hash was done.
        """
        header = chunk.sealed_header_unless_abandoned()
        if header is None:
            raise WriteAbandonedError(self.display_url, "put abandoned by its caller (timed out)")
        self.put(key, (header, chunk.payload))

    def puts_inline(self, size: int) -> bool:
        """Whether ``put_chunk_by`` can store an object of ``size`` bytes on the calling thread.

        Default False: the backend runs every put on its I/O threads and bounds it
        by waiting there. True only where each socket operation of the put can be
        bounded by the deadline itself (Redis plain ``SET``s), which spares the two
        thread hand-offs of every blocking put.
        """
        return False

    def gets_inline(self) -> bool:
        """Whether ``get_hashed_by`` can read an object on the calling thread (as ``puts_inline``).

        Default False: every get runs on the backend's I/O threads.
        """
        return False

    def get_hashed_by(self, key: CacheEngineKey, deadline: float) -> tuple[bytes | None, str | None] | None:
        """``get_hashed`` on the calling thread, giving up at ``deadline`` (``time.monotonic()``).

        Only where ``gets_inline()``. Returns None, having sent nothing, when it cannot
        start within the deadline's terms (Redis: no open connection free); the
        backend then gets by an I/O thread.

        Raises:
            StoreUnavailableError: the deadline passed, or the get failed.
        """
        raise NotImplementedError

    def put_chunk_by(self, key: CacheEngineKey, chunk: UnsealedChunk, deadline: float) -> bool:
        """``put_chunk`` on the calling thread, giving up at ``deadline`` (``time.monotonic()``).

        Only where ``puts_inline(chunk.size)``. Returns False, having sent nothing,
        when it cannot start within the deadline's terms (Redis: no open connection
        free); the backend then puts the chunk by an I/O thread. Nothing is sent
        after it has returned or raised.

        Raises:
            StoreUnavailableError: the deadline passed, or the put failed.
        """
        raise NotImplementedError

    def put_many(self, items: Sequence[tuple[CacheEngineKey, Sequence[bytes | memoryview]]]) -> None:
        for key, parts in items:
            self.put(key, parts)

    @abc.abstractmethod
    def exists(self, key: CacheEngineKey) -> bool: ...

    @abc.abstractmethod
    def delete(self, key: CacheEngineKey) -> bool:
        """Remove ``key``; True if it was there."""

    @abc.abstractmethod
    def list(self) -> Iterator[RemoteObject]:
        """Every chunk object under this connector's prefix; foreign names skipped."""

    def list_rank(self, fmt: str, model_name: str, world_size: int, worker_id: int) -> Iterator[RemoteObject]:
        """The chunks of one model, fmt and rank. Default: ``list()`` filtered; stores that
        can list by prefix override it, so other models' objects are never scanned."""
        scope = (fmt, model_name, world_size, worker_id)
        for obj in self.list():
            k = obj.key
            if (k.fmt, k.model_name, k.world_size, k.worker_id) == scope:
                yield obj

    def get_head(self, key: CacheEngineKey, nbytes: int) -> tuple[bytes, int] | None:
        """The object's first ``nbytes`` (fewer if it is shorter) and its full size.

        For header-only reads that still catch a truncated object (its size is not
        header + payload). None when absent. Default: reads the whole object.
        """
        data = self.get(key)
        return None if data is None else (bytes(data[:nbytes]), len(data))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and sockets. Idempotent."""


def _nbytes(value: Any) -> int:
    """Bytes of a read value: bytes-like, or a tensor (memoryviews and tensors have ``nbytes``)."""
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(value)
