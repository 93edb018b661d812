"""Chunk bytes in Redis: ``redis://``, ``rediss://`` (TLS), ``unix://`` and Redis Cluster.

URLs::

    redis://[user:password@]host:port/db        rediss://...   (TLS; ssl_* options pass through)
    unix:///path/to/redis.sock?db=N
    redis+cluster://[user:password@]host:port[,host:port...]   (rediss+cluster:// for TLS)

The Redis key of a chunk is ``<prefix>`` + ``key.to_string()``; ``prefix`` defaults to
``lmcache:`` and is given as the ``prefix`` option or a ``?prefix=`` query parameter.
Values are chunk bytes. ``list()`` walks ``SCAN MATCH <escaped prefix>*`` on every
primary, never ``KEYS``, and skips names that are not chunk keys or not strings.

Copies are what a 32 MiB chunk costs most, so every connection gets two redis-py hooks:

* a command packer that sends ``[header, payload]`` as one ``SET`` value without first
  joining them (a fresh 32 MiB join cost more than the SET itself on loopback);
* a reply buffer that reads a large bulk reply with ``recv_into`` straight into one
  uninitialised buffer, returned as a writable ``memoryview``; redis-py's own buffer
  copies a reply three to four times (measured: a 32 MiB GET 2-2.6x faster). Under
  ``get_hashed`` it also hashes a chunk's payload as the reply arrives.

Both fall back to redis-py's stock behaviour if its internals change. Cluster node
clients get them through a connection pool class.

A chunk of at least ``STREAM_PUT_BYTES`` is written in two steps, so that its payload
is hashed piece by piece just before each piece is sent rather than in one pass
before the ``SET`` (``chunk_format.UnsealedChunk``): ``SET`` of the header (checksum
still zeros) and payload under a staging name with a TTL, then one script that writes
the checksum in place, renames the staging key onto the chunk's name and drops the
TTL. Readers see the old value or the whole new one, never a staged one. The staging
name starts with the prefix (so an ACL of ``~<prefix>*`` allows it), is in the
chunk's cluster slot, and never parses as a key (``list()`` skips it); a writer that
dies between the two steps leaves it to expire. The script names the chunk first, so
a proxy that routes by the first key runs it where the chunk lives; a staging key
not found there is not published. Staging needs ``SET``, ``EVAL``, and inside the
script ``STRLEN``, ``GETRANGE``, ``SETRANGE``, ``RENAME`` and ``PERSIST``; a server that
refuses any of them (an ACL, a renamed command, a proxy without ``EVAL``), or where
staged keys keep vanishing, turns it off for the connector, which then sends plain
``SET``s; so does the ``staged_puts=false`` option.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import math
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable, Iterator, List, Sequence, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from lmcache_core import chunk_format
from lmcache_core.config import mask_url
from lmcache_core.errors import StoreDeniedError, StoreFullError, StoreUnavailableError, WriteAbandonedError
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.connector.base import CHUNK_OBJECT_BYTES, RemoteConnector, RemoteObject
from lmcache_core.storage_backend.mem_pool import BufferPool, shared_pool

DEFAULT_PREFIX = "lmcache:"
INSTALL_HINT = "pip install 'lmcache-toolkit[redis]'"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
STANDALONE_SCHEMES = ("redis", "rediss", "unix")
# Names per SCAN reply and per STRLEN pipeline: big enough to amortise round trips,
# small enough that one reply never holds the server up.
SCAN_COUNT = 1000
# Replies at least this long are read with recv_into (below it redis-py's buffer is fine).
LARGE_REPLY_BYTES = 256 * 1024
# Most bytes of warm reply buffers a process keeps (eight 32 MiB chunks, each with its header).
REPLY_POOL_BYTES = 8 * CHUNK_OBJECT_BYTES
_GLOB_SPECIAL = "\\*?[]"
MGET_BUDGET_BYTES = 64 * 1024 * 1024
# Bytes of values per MGET that a pipelined batched_get sends (fetch_group_keys).
FETCH_GROUP_BYTES = 1024 * 1024

# Chunks at least this large are staged and hashed as they are sent (module docstring).
# 32 MiB SETs on a 2-core loopback host: 0.92x raw redis-py hashing first, 1.05-1.08x
# staged; 8 MiB 0.95-0.97x and 1.09x. At 2 MiB the second round trip costs more than
# it saves (0.83-0.87x hashing first, 0.78-0.80x staged).
STREAM_PUT_BYTES = 4 * 1024 * 1024
# Piece of a staged payload: hashed, then sent while it is still in the CPU cache.
STREAM_PIECE_BYTES = 256 * 1024
# In every staging name; its two "@"s give a key string at least seven fields, so a
# staging name never parses as a key.
STAGING_MARK = b"@lmcache-staging@"
# A staging key left by a writer that died before publishing lives this long at most
# (or ten socket timeouts, if longer).
STAGING_TTL_S = 60
# Staged keys gone before publishing this many times in a row turn staging off.
STAGING_GONE_LIMIT = 3
# KEYS: chunk name, staging name. ARGV: checksum offset, checksum digits, value size.
# Returns 1 when published. STRLEN is 0 for a missing key: a staging key that expired,
# was evicted or lives on another server is not published: 0 (the caller then sends a
# plain SET), or 2 when the chunk already holds a value of this size and checksum (a
# retry of a publish whose reply was lost, or the same chunk put again).
_PUBLISH_SCRIPT = """
if redis.call('STRLEN', KEYS[2]) ~= tonumber(ARGV[3]) then
  local n = redis.pcall('STRLEN', KEYS[1])
  if n == tonumber(ARGV[3]) and redis.call('GETRANGE', KEYS[1], ARGV[1], ARGV[1] + 31) == ARGV[2] then
    return 2
  end
  return 0
end
redis.call('SETRANGE', KEYS[2], ARGV[1], ARGV[2])
redis.call('RENAME', KEYS[2], KEYS[1])
redis.call('PERSIST', KEYS[1])
return 1
"""
# What a staging step's error means (_staging_error).
_FULL, _REFUSED, _MOVING = "full", "refused", "moving"
#: A call on a backend I/O thread gives up reading large replies (``LARGE_REPLY_BYTES`` and
#: up) this many store timeouts after it started. The socket timeout bounds each read, not
#: the reply: a server or link that trickled a 4 MiB value 64 KiB every 0.25 s held a GET
#: and its I/O thread 16 s at a 0.5 s timeout, and an MGET of two such values 32 s, long
#: after the caller had given up.
READ_LIMIT_TIMEOUTS = 2.0
#: The smallest ``proto-max-bulk-len`` a Redis server accepts: values below it always fit.
MIN_BULK_LIMIT = 1024 * 1024
_UNASKED: Any = object()
#: Seconds before a server that did not answer ``CONFIG GET`` (a cluster node down) is asked
#: its bulk limit again; meanwhile values are sent unchecked.
BULK_LIMIT_REASK_S = 60.0
#: Seconds every call fails at once (``StoreDeniedError``) after the server refused the
#: password: each call otherwise opened a connection, twice, to be refused again (a wrong
#: password made 400 connections for 200 gets, and the circuit never opens for an answer).
DENIED_RETRY_S = 5.0
# Error codes of a server that is saving, loading, failing over or moving slots: errors
# that pass, never a refusal (MISCONF's text says writes are "disabled").
_TRANSIENT_CODES = frozenset(
    {"MISCONF", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS",
     "MOVED", "ASK", "EXECABORT"}
)  # fmt: skip
# Words of the errors for a command a server or proxy will not run for us, also from
# inside the script (Redis 6/7.0: "The user executing the script can't run this
# command", 7.2: "ACL failure in script", a renamed command: "Unknown Redis command
# called from script"). NOPERM and CROSSSLOT are recognised by their classes.
_REFUSAL_WORDS = (
    "unknown command", "unknown redis command", "acl failure", "can't run this command", "no permissions",
    "unsupported", "not supported", "not allowed from script",
)  # fmt: skip

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def _import_redis() -> Any:
    try:
        import redis
        import redis.cluster  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"Redis stores need the redis package: {INSTALL_HINT}"
        ) from exc
    return redis


def escape_glob(text: str) -> str:
    """Escape Redis glob characters (``* ? [ ] \\``) so ``text`` matches only itself."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def split_prefix(url: str) -> tuple[str, str | None]:
    """Remove ``prefix=`` from the URL's query; returns (url without it, the prefix or None)."""
    return split_query(url, "prefix")


def split_query(url: str, name: str) -> tuple[str, str | None]:
    """Remove ``name=`` from the URL's query; returns (url without it, its value or None).

    For our own options, which redis-py would refuse.
    """
    # String surgery, not urlunsplit: that turns "unix:///path" into "unix:/path".
    base, sep, query = url.partition("?")
    if not sep:
        return url, None
    value = None
    kept = []
    for key, item in parse_qsl(query, keep_blank_values=True):
        if key == name:
            value = item
        else:
            kept.append((key, item))
    if value is None:
        return url, None
    return (f"{base}?{urlencode(kept)}" if kept else base), value


class RedisConnector(RemoteConnector):
    """Chunk bytes by key in one Redis database or a Redis Cluster.

    Thread-safe (redis-py pools connections; one client per process) and fork-safe: a
    child process notices the pid change and opens its own client, never touching the
    parent's sockets. Every call is bounded by ``timeout`` (connect and each socket
    read/write); a stale pooled connection (server restarted) is retried once on a fresh
    one. Transport failures raise ``StoreUnavailableError``; Redis at ``maxmemory``
    raises ``StoreFullError``; a command an ACL or a read-only replica refuses raises
    ``StoreDeniedError``. With ``max_connections``, a call waits up to ``timeout`` for
    a pooled connection to come free rather than failing at once.

    Args:
        url: see the module docstring; secrets in it never reach a message.
        timeout: seconds for connecting and for each socket operation.
        **options: ``prefix`` (default ``lmcache:``), ``health_check_interval`` (seconds,
            default 30), ``staged_puts`` (default true, also ``?staged_puts=false`` in
            the URL; false sends every chunk as one plain ``SET``), and any redis-py
            client option (``ssl_ca_certs``,
            ``ssl_cert_reqs``, ``max_connections``, ``username``, ...).

    Raises:
        ValueError: a malformed URL, an unknown scheme, or an empty prefix.
        ImportError: the redis package is missing.
    """

    def __init__(self, url: str, *, timeout: float, **options: Any) -> None:
        self._redis = _import_redis()
        if not isinstance(url, str) or "://" not in url:
            raise ValueError("Redis store URL must look like redis://host:port/db")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout!r}")
        self.display_url = mask_url(url)
        self.timeout = float(timeout)
        stripped, url_prefix = split_prefix(url)
        stripped, url_staged = split_query(stripped, "staged_puts")
        opt_prefix = options.pop("prefix", None)
        if url_prefix is not None and opt_prefix is not None and url_prefix != opt_prefix:
            raise ValueError("prefix given both in the URL and as an option, with different values")
        prefix = opt_prefix if opt_prefix is not None else url_prefix
        prefix = DEFAULT_PREFIX if prefix is None else prefix
        if not isinstance(prefix, str) or not prefix:
            # An empty prefix would make list() a scan of the whole database.
            raise ValueError("prefix: must be a non-empty string (default 'lmcache:')")
        self.prefix = prefix
        self._prefix_bytes = prefix.encode("utf-8")
        scheme = urlsplit(stripped).scheme.lower()
        self.cluster = scheme in CLUSTER_SCHEMES
        if not self.cluster and scheme not in STANDALONE_SCHEMES:
            raise ValueError(
                f"not a Redis URL scheme: {scheme!r}; known: "
                f"{', '.join(STANDALONE_SCHEMES + CLUSTER_SCHEMES)}"
            )
        self._url = stripped
        self._options = options
        staged = options.pop("staged_puts", url_staged if url_staged is not None else True)
        options.setdefault("health_check_interval", 30)
        # Parse now so a malformed URL fails at construction, not at the first call.
        try:
            if self.cluster:
                self._cluster_args = _parse_cluster_url(stripped)
                url_options = self._cluster_args["kwargs"]
            else:
                url_options = self._redis.connection.parse_url(stripped)
                _check_db_path(stripped)
                _check_option_names(self._redis, url_options, options)
        except ValueError as exc:
            # Only our own messages: redis-py's quote parts of the URL, and in a mistyped
            # one (a '/' in the password) those parts are the password.
            why = str(exc) if isinstance(exc, _UrlError) else "expected redis://[user:pw@]host:port/db"
            raise ValueError(f"not a valid Redis URL: {self.display_url}: {why}") from None
        self._hooks = _fast_path_hooks(int(options.get("protocol") or 2))
        # A pool given max_connections waits for a free connection (_waiting_pool_class).
        # Without it redis-py's own class is kept, sparing release() a wake-up: its
        # default bound (2**31 in redis-py 5, 100 in 8) is beyond the I/O threads
        # and callers one store has at once.
        bounded = options.get("max_connections", url_options.get("max_connections")) is not None
        self._pool_class: Any = _waiting_pool_class() if bounded else self._redis.ConnectionPool
        #: whether ``put`` sends header and payload without joining them first
        self.zero_copy_put = "command_packer" in self._hooks
        #: whether ``put_chunk`` stages large chunks and hashes them as they are sent
        self.staged_puts = self.zero_copy_put and _streaming_send_loop() and _as_flag("staged_puts", staged)
        # Blocking plain SETs run on the caller's thread (``put_chunk_by``): standalone
        # servers only (a cluster client follows redirections on its own).
        self._inline_puts = not self.cluster and self.zero_copy_put and _redis_py_fits_inline_puts()
        self._staging_ttl_ms = int(max(STAGING_TTL_S, 10 * self.timeout) * 1000)
        self._staging_gone = 0  # staged keys gone before publishing, in a row
        # The server's proto-max-bulk-len: _UNASKED, an int, or None (it would not say,
        # or did not answer: then asked again from _bulk_reask_at on).
        self._bulk_limit: int | None = _UNASKED
        self._bulk_reask_at = math.inf
        # A refused password: (time.monotonic() until which calls fail at once, the error).
        self._denied: tuple[float, str] = (-math.inf, "")
        #: about how many reply bytes one MGET of ``get_many`` may ask for
        self.mget_budget_bytes = MGET_BUDGET_BYTES
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        self._client_obj: Any = None
        self._pid = -1
        self._closed = False

    # -- clients -------------------------------------------------------------------

    def _client(self) -> Any:
        until, why = self._denied
        if until > time.monotonic():
            raise StoreDeniedError(self.display_url, why)
        pid = os.getpid()
        client = self._client_obj
        if client is not None and self._pid == pid:
            return client
        with self._process_lock():
            if self._closed:
                raise StoreUnavailableError(self.display_url, "connector is closed")
            if self._client_obj is None or self._pid != os.getpid():
                # In a forked child the parent's client is dropped unclosed: closing it
                # would shut sockets the parent still uses.
                self._client_obj = self._make_client()
                self._pid = os.getpid()
            return self._client_obj

    def _process_lock(self) -> threading.Lock:
        pid = os.getpid()
        if self._lock_pid != pid:
            # A lock that a parent thread held at fork() stays held in the child forever.
            self._lock = threading.Lock()
            self._lock_pid = pid
        return self._lock

    def _retry(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One retry, on connection errors only: it replaces a pooled connection that a
        # server restart left dead. Timeouts are not retried here; the backend decides.
        # Nor is a refused password (a ConnectionError to redis-py): it is refused again.
        refused = self._redis.exceptions.AuthenticationError

        class StaleConnectionRetry(Retry):  # type: ignore[misc]
            def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
                def fail_unless_refused(error: Exception, *more: Any) -> None:
                    fail(error, *more)  # redis-py's cleanup (it drops the connection)
                    if isinstance(error, refused):
                        raise error

                return super().call_with_retry(do, fail_unless_refused, *args, **kwargs)

        return StaleConnectionRetry(NoBackoff(), 1, supported_errors=(self._redis.exceptions.ConnectionError,))

    def _make_client(self) -> Any:
        redis = self._redis
        common = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "client_name": "lmcache",
        }
        if self.cluster:
            cluster_kwargs: dict[str, Any] = {
                **common, "protocol": 2, **self._cluster_args["kwargs"], **self._options
            }
            nodes = list(self._cluster_args["startup_nodes"])
            if self._hooks:
                # Node clients take connection options only through a pool class, and
                # RedisCluster uses one only when given a url: name the first node so.
                first = nodes.pop(0)
                host = f"[{first.host}]" if ":" in first.host else first.host
                scheme = "rediss" if cluster_kwargs.pop("ssl", False) else "redis"
                cluster_kwargs["url"] = f"{scheme}://{host}:{first.port}"
                # cleanup_kwargs() in RedisCluster drops health_check_interval; the pool keeps it.
                extra = {"health_check_interval": cluster_kwargs.pop("health_check_interval", 30)}
                cluster_kwargs["connection_pool_class"] = _pool_class({**self._hooks, **extra}, self._pool_class)
            elif self._pool_class is not redis.ConnectionPool:
                cluster_kwargs["connection_pool_class"] = self._pool_class
            try:
                return redis.cluster.RedisCluster(startup_nodes=nodes, retry=self._retry(), **cluster_kwargs)
            except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
                raise StoreUnavailableError(self.display_url, f"cannot reach the cluster: {exc}") from exc
        # RESP2: every server and proxy speaks it, and it needs no HELLO round trip.
        kwargs: dict[str, Any] = {**self._hooks, **common, "retry": self._retry(), "protocol": 2}
        kwargs.update(self._options)
        pool = self._pool_class.from_url(self._url, **kwargs)
        return redis.Redis(connection_pool=pool)

    def _name(self, key: CacheEngineKey) -> bytes:
        if not isinstance(key, CacheEngineKey):
            raise TypeError(f"key must be a CacheEngineKey, got {type(key).__name__}")
        return self._prefix_bytes + key.to_string().encode("utf-8")

    def _parse_name(self, name: bytes | str) -> CacheEngineKey | None:
        if isinstance(name, str):
            name = name.encode("utf-8", "surrogateescape")
        if not name.startswith(self._prefix_bytes):
            return None
        try:
            return CacheEngineKey.from_string(name[len(self._prefix_bytes) :].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None  # a foreign name under our prefix: not ours to list

    def _call(self, what: str, fn: Callable[[Any], _T]) -> _T:
        """Run ``fn(client)``, translating redis-py errors into the project's. Every read
        of a large reply ends by ``READ_LIMIT_TIMEOUTS`` store timeouts from now."""
        redis = self._redis
        bounded = getattr(_arriving, "deadline", None) is None
        if bounded:
            _arriving.deadline = time.monotonic() + READ_LIMIT_TIMEOUTS * self.timeout
        try:
            return fn(self._client())
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise self._store_error(what, exc) from exc
        finally:
            if bounded:
                _arriving.deadline = None

    def _store_error(self, what: str, exc: BaseException) -> Exception:
        """The project's error for a failed Redis command: ``StoreFullError`` at maxmemory,
        ``StoreDeniedError`` for an ACL's or a read-only replica's refusal, else
        ``StoreUnavailableError`` (a transport failure or another error reply)."""
        redis = self._redis
        if isinstance(exc, StoreUnavailableError):
            return exc  # ours already (_client's StoreDeniedError while a password is refused)
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            return StoreFullError(self.display_url, f"{what}: Redis is at maxmemory ({exc})")
        if isinstance(exc, (redis.exceptions.NoPermissionError, redis.exceptions.ReadOnlyError)):
            return StoreDeniedError(self.display_url, f"{what}: {type(exc).__name__}: {exc}")
        if isinstance(exc, redis.exceptions.AuthenticationError):
            # A wrong or missing password: the server is up and said no. As an outage it
            # was retried, opened the circuit, and the CLI said to check the server. Calls
            # fail at once for a while (_client): each would connect to be refused again.
            why = f"{what}: authentication failed ({exc})"
            self._denied = (time.monotonic() + DENIED_RETRY_S, why)
            return StoreDeniedError(self.display_url, why)
        return StoreUnavailableError(self.display_url, f"{what}: {type(exc).__name__}: {exc}")

    # -- RemoteConnector -----------------------------------------------------------

    def get(self, key: CacheEngineKey) -> bytes | None:
        """The stored bytes, or None when absent or not a string.

        Large values come back as a writable ``memoryview`` (bytes-like, read once off
        the socket); ``chunk_format.decode`` wraps it without copying.
        """
        return self._get(key)

    def _get(self, key: CacheEngineKey) -> bytes | None:
        name = self._name(key)
        value: bytes | None = self._call("GET", lambda c: _none_on_wrongtype(self._redis, lambda: c.get(name)))
        self.learn_value_sizes((value,))
        return value

    def get_hashed(self, key: CacheEngineKey) -> tuple[bytes | None, str | None]:
        """``get``, hashing a large chunk's payload as its reply arrives (see ``_arriving``).

        The read loop waits on redis-server (which writes a big reply 64 KiB per
        event loop turn): hashing there hid the ~2.2 ms second pass over 32 MiB.
        Thread-safe: the hasher is handed to the reply reader through a thread-local,
        as redis-py reads a command's reply on the thread that sent it.
        """
        payload = chunk_format.ArrivingPayload()
        _arriving.payload = payload
        try:
            value = self._get(key)  # not self.get: an override could change the bytes after hashing
        finally:
            _arriving.payload = None
        return value, payload.digest(value) if value is not None else None

    def gets_inline(self) -> bool:
        """True for a standalone server's own connection pool (``get_hashed_by``) once reads
        have shown values of ``LARGE_REPLY_BYTES`` or more: every read of such a reply is
        bounded by the deadline, where redis-py bounds a small reply's reads only each by
        the time left when it started. Until a read has shown the size, and for small
        values, gets go by the backend's I/O threads."""
        learned = self.learned_value_bytes()
        return self._inline_puts and learned is not None and learned >= LARGE_REPLY_BYTES

    def get_hashed_by(self, key: CacheEngineKey, deadline: float) -> tuple[bytes | None, str | None] | None:
        """``get_hashed`` on this thread; no socket wait outlives ``deadline``.

        Spares the two thread hand-offs of a get run by the backend's I/O thread
        (about 45 us on a 2-core VM: a 2 MiB GET ran at 0.84x raw redis-py that way).
        As ``put_chunk_by``: only on a pooled connection already open (None when none
        is free: the backend then gets by an I/O thread); the send and every read of
        the reply get the time left as their socket timeout (a large reply's reads
        too, through ``_arriving.deadline``); a connection given up midway is dropped.

        Raises:
            StoreUnavailableError: the deadline passed, or a transport or server error.
        """
        redis = self._redis
        name = self._name(key)
        payload = chunk_format.ArrivingPayload()
        try:
            _time_left(deadline)
            pool = self._client().connection_pool
            if type(pool) is not self._pool_class or getattr(pool, "cache", None) is not None:
                self._inline_puts = False  # as put_chunk_by: leave other pools to redis-py
                return None
            conn = _take_open_connection(pool, redis)
            if conn is None:
                return None
            _arriving.payload, _arriving.deadline = payload, deadline
            clean = False  # set once the reply is read: only then may others use the connection
            try:
                _send_by(conn, conn.pack_command("GET", name), deadline)
                value = _none_on_wrongtype(redis, lambda: conn.read_response(timeout=_time_left(deadline)))
                clean = True
            except redis.exceptions.ResponseError:
                clean = True  # the server answered: the connection is fine
                raise
            finally:
                _arriving.payload = _arriving.deadline = None
                try:
                    _give_back(pool, conn, clean)
                except BaseException:  # interrupted giving it back: closed, it goes back now
                    _give_back_unless_released(pool, conn)
                    raise
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self._store_error("GET", exc) from exc
        self.learn_value_sizes((value,))
        return value, payload.digest(value) if value is not None else None

    def get_many(self, keys: Sequence[CacheEngineKey]) -> List[bytes | None]:
        """``MGET`` (per slot on a cluster), aligned with ``keys``, None for misses.

        Keys go in consecutive MGETs of about ``mget_budget_bytes`` each, sized by the
        largest value of the latest read. Redis builds a whole reply in its output buffer
        (counted in ``used_memory``) before sending it: one MGET of sixteen 32 MiB chunks
        would hold 512 MiB there per client and can push a nearly full server into
        OOM errors or evictions. On loopback the split costs nothing measurable (16
        chunks of 32 MiB: 1, 2 or 16 per MGET within noise); small chunks still go many
        to a round trip.
        """
        names = [self._name(k) for k in keys]
        values: List[bytes | None] = []
        start = 0
        while start < len(names):
            step = max(1, self.mget_budget_bytes // max(1, self._value_hint))
            group = names[start : start + step]
            start += len(group)

            def fetch(client: Any, group: List[bytes] = group) -> List[Any]:
                if self.cluster:
                    return client.mget_nonatomic(group)  # type: ignore[no-any-return]
                return client.mget(group)  # type: ignore[no-any-return]

            got = self._call("MGET", fetch)
            values.extend(got)
            self.learn_value_sizes(got)
        return values

    def fetch_group_keys(self) -> int | None:
        """Small values: many per MGET (one round trip). Large ones: one key per MGET.

        Redis builds a whole MGET reply before sending it and then writes at most
        64 KiB per client per event-loop turn, so a group of large values on one
        connection queues behind itself, while single-key requests on several
        connections are served side by side and decoded as each arrives. Sixteen
        2 MiB chunks on a 2-core loopback host: groups of four values ran at
        0.75-0.9x sixteen sequential gets, one value per group (four in flight) at
        1.3-1.6x; 32 MiB chunks 0.98x and 1.1-1.3x. None (split evenly) until a
        read has shown the real value size: a cold connector, or a batch of
        absent keys, must not become one request per key.
        """
        if not self._value_learned:
            return None
        return max(1, FETCH_GROUP_BYTES // max(1, self._value_hint))

    def put(self, key: CacheEngineKey, parts: Sequence[bytes | memoryview]) -> None:
        """``SET`` the concatenation of ``parts``; one command, so readers never see half."""
        name = self._name(key)
        value = self._value(parts)
        self._check_fits("SET", sum(memoryview(p).nbytes for p in parts))
        self._call("SET", lambda c: c.execute_command("SET", name, value))

    def put_chunk(self, key: CacheEngineKey, chunk: chunk_format.UnsealedChunk) -> None:
        """Store a chunk, staged and hashed as it is sent when large (module docstring)."""
        name = self._name(key)
        self._check_fits("SET", chunk.size)
        large = self.staged_puts and chunk.size >= STREAM_PUT_BYTES
        staging = _staging_name(name, self._prefix_bytes) if large else None
        if staging is None or not self._put_staged(name, staging, chunk):
            super().put_chunk(key, chunk)  # a plain SET, unless the caller gave up

    def puts_inline(self, size: int) -> bool:
        """True for plain ``SET``s on a standalone server (``put_chunk_by``); staged puts
        (two commands) stay on the backend's I/O threads, as does the first put large
        enough to need the server's ``proto-max-bulk-len`` (``_check_fits`` asks for it)."""
        if size >= MIN_BULK_LIMIT and self._bulk_limit_due():
            return False
        return self._inline_puts and not (self.staged_puts and size >= STREAM_PUT_BYTES)

    def put_chunk_by(self, key: CacheEngineKey, chunk: chunk_format.UnsealedChunk, deadline: float) -> bool:
        """A plain ``SET`` of the sealed chunk on this thread; no socket wait outlives ``deadline``.

        Only on a pooled connection that is already open (``_take_open_connection``):
        opening one waits on the pool's timeouts (connect, then each handshake reply),
        not on the deadline, so with none free this sends nothing and returns False,
        and the backend puts the chunk by an I/O thread. The pieces of the zero-copy
        packer (command, header, payload, end) go out in one gathering ``sendmsg``
        (redis-py's send loop makes one ``sendall`` per piece; 2 MiB on a 2-core
        loopback host: 0.91-0.95x raw redis-py ``SET``, where the same put handed
        to an I/O thread and waited for ran at 0.66-0.72x).
        Each send and the reply wait get the time left as their socket timeout. A
        connection given up midway is dropped, so a half-sent command never reaches
        its next user. As with any remote write, a put that times out after its
        bytes went out may still be applied by the server.

        Raises:
            StoreFullError: Redis is at ``maxmemory``.
            StoreUnavailableError: the deadline passed, or a transport or server error.
        """
        redis = self._redis
        if chunk.size >= MIN_BULK_LIMIT and self._bulk_limit_due():
            return False  # asking the server its limit is a round trip of its own: an I/O thread's
        self._check_fits("SET", chunk.size)
        header = chunk.sealed_header()  # never abandoned: its caller is this thread
        # The zero-copy packer's pieces (command, header, payload, end): views, no join.
        parts = self._hooks["command_packer"].pack("SET", self._name(key), ChunkValue((header, chunk.payload)))
        try:
            _time_left(deadline)
            pool = self._client().connection_pool
            if type(pool) is not self._pool_class or getattr(pool, "cache", None) is not None:
                # Another pool class (a user's, or client-side caching's connection proxies)
                # keeps its connections differently: leave them to redis-py.
                self._inline_puts = False
                return False
            conn = _take_open_connection(pool, redis)
            if conn is None:
                return False
            clean = False  # set once the reply is read: only then may others use the connection
            try:
                _send_by(conn, parts, deadline)
                conn.read_response(timeout=_time_left(deadline))
                clean = True
            except redis.exceptions.ResponseError:
                clean = True  # the server answered: the connection is fine
                raise
            finally:
                try:
                    _give_back(pool, conn, clean)
                except BaseException:  # interrupted giving it back: closed, it goes back now
                    _give_back_unless_released(pool, conn)
                    raise
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self._store_error("SET", exc) from exc
        return True

    def _put_staged(self, name: bytes, staging: bytes, chunk: chunk_format.UnsealedChunk) -> bool:
        """Stage, then publish; False when the caller should send a plain ``SET`` instead.

        A transport failure raises and leaves the staging key to its TTL (a ``DEL``
        would wait out another timeout on a server that is not answering).
        """
        # The packer sends an UnsealedChunk argument as its header, then its payload
        # hashed piece by piece.
        outcome = self._call(
            "SET (staging)", lambda c: self._outcome(c, "SET", staging, chunk, "PX", self._staging_ttl_ms)
        )
        if outcome is _FULL:
            raise StoreFullError(self.display_url, "SET (staging): Redis is at maxmemory")
        if outcome is _REFUSED or outcome is _MOVING:
            return False
        if chunk.abandoned:  # its caller timed out: the bytes sent may have changed meanwhile
            with contextlib.suppress(Exception):
                self._call("DEL (staging)", lambda c: c.delete(staging))
            raise WriteAbandonedError(self.display_url, "put abandoned by its caller (timed out) before publishing")
        args = (chunk.checksum_offset, chunk.digest(), chunk.size)
        outcome = self._call(
            "EVAL (publish)", lambda c: self._outcome(c, "EVAL", _PUBLISH_SCRIPT, 2, name, staging, *args)
        )
        if outcome == 1:
            self._staging_gone = 0
            return True
        # Not published: the staged value goes (at maxmemory a plain SET may fit once it
        # has, and raises StoreFullError itself if not; during a slot migration a plain
        # SET follows the slot).
        with contextlib.suppress(Exception):
            self._call("DEL (staging)", lambda c: c.delete(staging))
        if outcome == 2:
            return True  # the chunk holds this very value already
        if outcome == 0:
            self._staging_gone += 1
            if self._staging_gone >= STAGING_GONE_LIMIT:
                self._staging_off(f"{STAGING_GONE_LIMIT} staged keys in a row were gone before publishing")
        return False

    def _outcome(self, client: Any, *args: Any) -> Any:
        """The command's reply, or ``_FULL``/``_REFUSED``/``_MOVING`` (other errors raise).

        A refusal turns staging off for this connector: it would be refused again.
        """
        redis = self._redis
        try:
            return client.execute_command(*args)
        except redis.exceptions.ResponseError as exc:
            meaning = _staging_error(redis, exc)
            if meaning is None:
                raise
            if meaning is _REFUSED:
                self._staging_off(f"the server refused {args[0]}: {str(exc):.200}")
            return meaning
        except redis.exceptions.ClusterError:
            # redis-py's cluster client gives up on TRYAGAIN (a slot migrating: the two
            # names on different nodes for now) with "TTL exhausted"; a plain SET works.
            if args[0] != "EVAL":
                raise
            return _MOVING

    def _check_fits(self, what: str, size: int) -> None:
        """Refuse a value longer than the server's ``proto-max-bulk-len``.

        The server answers such a ``SET`` by closing the connection mid-send, which
        reads as an outage: with a 1 MB limit and 2 MiB chunks every put failed as
        "connection reset", was retried, and opened the circuit, so gets of small
        chunks failed too. The limit is asked once (``CONFIG GET``), at the first value
        that could exceed it; a server that will not say is not checked.

        Raises:
            StoreFullError: the value is longer than the limit (an answer: no retry,
                no strike against the circuit).
        """
        if size < MIN_BULK_LIMIT:
            return
        if self._bulk_limit_due():
            self._bulk_limit = self._ask_bulk_limit()
        limit = self._bulk_limit
        if limit is not None and size > limit:
            raise StoreFullError(
                self.display_url,
                f"{what}: a value of {size} bytes is longer than the server's proto-max-bulk-len ({limit})",
            )

    def _bulk_limit_due(self) -> bool:
        """Whether the server's ``proto-max-bulk-len`` is to be asked (never yet, or again)."""
        return self._bulk_limit is _UNASKED or time.monotonic() >= self._bulk_reask_at

    def _ask_bulk_limit(self) -> int | None:
        """The server's ``proto-max-bulk-len`` (the smallest of a cluster's primaries), or
        None when it refuses ``CONFIG GET`` (an ACL, a managed service), answers oddly, or
        does not answer (then asked again ``BULK_LIMIT_REASK_S`` later: the put itself
        reports an outage).

        Raises:
            StoreDeniedError: the password is refused.
        """
        redis = self._redis
        self._bulk_reask_at = math.inf
        try:
            client = self._client()
            if self.cluster:
                # Else one node answers for all, and keys on a node with a lower limit
                # got the "connection reset" outage back.
                reply = client.config_get("proto-max-bulk-len", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
            else:
                reply = client.config_get("proto-max-bulk-len")
        except redis.exceptions.ResponseError:
            return None
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            error = self._store_error("CONFIG GET", exc)
            if isinstance(error, StoreDeniedError):
                raise error from exc
            self._bulk_reask_at = time.monotonic() + BULK_LIMIT_REASK_S
            return None
        return _bulk_limit_of(reply)

    def _staging_off(self, why: str) -> None:
        if self.staged_puts:
            self.staged_puts = False
            logger.warning("%s: staged puts off, plain SETs from now on: %s", self.display_url, why)

    def put_many(self, items: Sequence[tuple[CacheEngineKey, Sequence[bytes | memoryview]]]) -> None:
        """All ``SET``s in one pipeline (per node on a cluster)."""
        if not items:
            return
        commands = [(self._name(k), self._value(parts)) for k, parts in items]
        self._check_fits("SET (pipeline)", max(sum(memoryview(p).nbytes for p in parts) for _, parts in items))

        def run(c: Any) -> None:
            pipe = c.pipeline(transaction=False)
            for name, value in commands:
                pipe.execute_command("SET", name, value)
            pipe.execute()

        self._call("SET (pipeline)", run)

    def exists(self, key: CacheEngineKey) -> bool:
        name = self._name(key)
        return bool(self._call("EXISTS", lambda c: c.exists(name)))

    def delete(self, key: CacheEngineKey) -> bool:
        name = self._name(key)
        return bool(self._call("DEL", lambda c: c.delete(name)))

    def get_head(self, key: CacheEngineKey, nbytes: int) -> tuple[bytes, int] | None:
        """First ``nbytes`` and length in one round trip (``GETRANGE``, ``STRLEN``, ``EXISTS``
        pipelined); None when absent or not a string."""
        name = self._name(key)
        redis = self._redis

        def run(c: Any) -> tuple[bytes, int] | None:
            pipe = c.pipeline(transaction=False)
            pipe.getrange(name, 0, max(nbytes, 1) - 1)
            pipe.strlen(name)
            pipe.exists(name)  # GETRANGE and STRLEN answer "" and 0 for a missing key too
            head, size, found = pipe.execute(raise_on_error=False)
            for reply in (head, size, found):
                if isinstance(reply, redis.exceptions.ResponseError) and str(reply).startswith("WRONGTYPE"):
                    return None  # a hash/list/... under our prefix is foreign: a miss
                if isinstance(reply, Exception):
                    raise reply
            return (bytes(head[:nbytes]), int(size)) if found else None

        return self._call("GETRANGE", run)

    def list(self) -> Iterator[RemoteObject]:
        """Every chunk under the prefix with its size (``STRLEN``); no mtime in Redis.

        Walks ``SCAN`` on each primary, so it sees a consistent-enough snapshot without
        blocking the server; names that do not parse as keys, or hold non-strings, are
        skipped.
        """
        return self._list_matching(escape_glob(self.prefix) + "*")

    def list_rank(self, fmt: str, model_name: str, world_size: int, worker_id: int) -> Iterator[RemoteObject]:
        """The chunks of one model, fmt and rank: ``SCAN MATCH`` on their names only."""
        scope = (fmt, model_name, world_size, worker_id)
        start = CacheEngineKey(fmt, model_name, world_size, worker_id, "0").to_string()[:-1]
        for obj in self._list_matching(escape_glob(self.prefix + start) + "*"):
            k = obj.key
            if (k.fmt, k.model_name, k.world_size, k.worker_id) == scope:
                yield obj

    def _list_matching(self, pattern: str) -> Iterator[RemoteObject]:
        for node in self._call("SCAN", self._scan_targets):
            batch: List[tuple[bytes, CacheEngineKey]] = []
            for name in self._scan(node, pattern):
                key = self._parse_name(name)
                if key is not None:
                    batch.append((name, key))
                if len(batch) >= SCAN_COUNT:
                    yield from self._sized(node, batch)
                    batch = []
            if batch:
                yield from self._sized(node, batch)

    def close(self) -> None:
        """Disconnect every pooled connection. Idempotent; later calls raise."""
        with self._process_lock():
            self._closed = True
            client, self._client_obj = self._client_obj, None
            owned = self._pid == os.getpid()
        if client is not None and owned:
            try:
                client.close()
                # A client given its pool (ours) leaves it open on close(): shut it too.
                pool = getattr(client, "connection_pool", None)
                if pool is not None:
                    pool.disconnect()
            except Exception:  # noqa: BLE001 - best effort; the sockets go with the object
                pass

    def __repr__(self) -> str:
        return f"RedisConnector({self.display_url!r}, prefix={self.prefix!r})"

    # -- helpers -------------------------------------------------------------------

    def _value(self, parts: Sequence[bytes | memoryview] | bytes | bytearray | memoryview) -> Any:
        if isinstance(parts, (bytes, bytearray, memoryview)):
            return parts
        if self.zero_copy_put:
            return ChunkValue(parts)
        return b"".join(parts)

    def _scan_targets(self, client: Any) -> List[Any]:
        if self.cluster:
            return [node.redis_connection or client.get_redis_connection(node)
                    for node in client.get_primaries()]
        return [client]

    def _scan(self, node: Any, pattern: str) -> Iterator[bytes]:
        cursor = 0
        while True:
            def step(_client: Any, cur: int = cursor) -> tuple[int, List[bytes]]:
                return node.scan(cursor=cur, match=pattern, count=SCAN_COUNT)  # type: ignore[no-any-return]

            cursor, names = self._call("SCAN", step)
            yield from names
            if int(cursor) == 0:
                return

    def _sized(self, node: Any, batch: List[tuple[bytes, CacheEngineKey]]) -> Iterator[RemoteObject]:
        def run(_c: Any) -> List[Any]:
            pipe = node.pipeline(transaction=False)
            for name, _key in batch:
                pipe.strlen(name)
            return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

        sizes = self._call("STRLEN", run)
        # 0 is a key deleted between SCAN and STRLEN, or an empty value: a chunk cut
        # short, which verify must see (and --fix remove). EXISTS tells them apart.
        empty = [name for (name, _key), size in zip(batch, sizes, strict=True) if size == 0]
        present: set[bytes] = set()
        if empty:

            def exists(_c: Any) -> List[Any]:
                pipe = node.pipeline(transaction=False)
                for name in empty:
                    pipe.exists(name)
                return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

            found = self._call("EXISTS", exists)
            present = {name for name, n in zip(empty, found, strict=True) if n == 1}
        for (name, key), size in zip(batch, sizes, strict=True):
            # An error (WRONGTYPE) marks a non-string under our prefix: not a chunk.
            if isinstance(size, int) and not isinstance(size, bool) and (size > 0 or name in present):
                yield RemoteObject(key, size=size)


def _check_option_names(redis: Any, url_options: dict[str, Any], options: dict[str, Any]) -> None:
    """Refuse an option no redis-py connection or pool takes.

    redis-py hands unknown URL query options to the connection as they are, so
    ``redis://h:6379/0?timeout=0.5`` opened fine and every call then failed as
    "store unavailable: TypeError ... unexpected keyword argument 'timeout'", a
    strike against the circuit each.

    Raises:
        _UrlError: an unknown option, with the nearest known name when there is one.
    """
    import difflib

    connection_class = url_options.get("connection_class") or redis.Connection
    accepted: set[str] = set()
    for cls in (*connection_class.__mro__, redis.ConnectionPool):
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return  # a signature we cannot read: let redis-py judge
        accepted.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    for name in (*url_options, *options):
        if name not in accepted:
            near = difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            if name.startswith("ssl_"):
                hint = " (TLS options need a rediss:// URL)"
            raise _UrlError(f"unknown option {name!r}{hint}")


def _bulk_limit_of(reply: Any) -> int | None:
    """``proto-max-bulk-len`` from a ``CONFIG GET`` reply: ``{name: value}``, or per node
    on a cluster ``{node: {name: value}}`` (the smallest); None when there is none."""
    if not isinstance(reply, dict):
        return None
    found: list[int] = []
    for name, value in reply.items():
        if isinstance(value, dict):
            limit = _bulk_limit_of(value)
            if limit is None:
                return None  # a node that will not say may have any limit
            found.append(limit)
        elif (name.decode() if isinstance(name, bytes) else str(name)) == "proto-max-bulk-len":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if not text.isdigit():
                return None
            found.append(int(text))
    return min(found) if found else None


def _none_on_wrongtype(redis: Any, fn: Callable[[], _T]) -> _T | None:
    try:
        return fn()
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith("WRONGTYPE"):
            return None  # a hash/list/... under our prefix is foreign: a miss
        raise


class _UrlError(ValueError):
    """A malformed Redis URL, in words that quote none of it."""


def _check_db_path(url: str) -> None:
    """Refuse a database path redis-py would quietly misread (``/notadb`` -> db 0, ``/1/5`` -> 15).

    A ``unix://`` URL's path is its socket (the database comes from ``?db=``).
    """
    parts = urlsplit(url)
    if parts.scheme.lower().startswith("unix") or parts.path in ("", "/"):
        return
    db = parts.path[1:]
    if not db.isascii() or not db.isdigit():
        raise _UrlError("the path names the database: /<number>")  # not the path: it may hold a password


def _parse_cluster_url(url: str) -> dict[str, Any]:
    """``redis+cluster://[user:pw@]h:p[,h:p...][/0][?opts]`` -> RedisCluster arguments."""
    from redis.cluster import ClusterNode
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    kwargs: dict[str, Any] = {}
    if userinfo:
        user, sep, password = userinfo.partition(":")
        if user:
            kwargs["username"] = unquote(user)
        if sep:
            kwargs["password"] = unquote(password)
    nodes = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, port = item[1:].partition("]:")
        else:
            host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            # Not the item itself: with a '/' in the password, it holds part of it.
            raise _UrlError("a Redis Cluster node is not host:port")
        nodes.append(ClusterNode(unquote(host), int(port)))
    if not nodes:
        raise _UrlError("Redis Cluster URL names no node: redis+cluster://host:port[,host:port]")
    if parts.path not in ("", "/", "/0"):
        raise _UrlError("Redis Cluster has only database 0")
    for name, value in parse_qsl(parts.query):
        if name == "ssl":
            kwargs["ssl"] = value.lower() in ("1", "true", "yes", "on")
        elif name in URL_QUERY_ARGUMENT_PARSERS:
            parse: Callable[[str], Any] = URL_QUERY_ARGUMENT_PARSERS[name]  # type: ignore[assignment]
            kwargs[name] = parse(value)
        else:
            kwargs[name] = value
    if parts.scheme.lower().startswith("rediss"):
        kwargs["ssl"] = True
    return {"startup_nodes": nodes, "kwargs": kwargs}


# -- redis-py hooks for a standalone server ------------------------------------------


class ChunkValue:
    """A command argument made of several buffers, sent back to back as one value."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        # cast("B") makes len() a byte count whatever the source's format was.
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.nbytes = sum(p.nbytes for p in self.parts)


def _staging_error(redis: Any, exc: Exception) -> str | None:
    """What a staging step's ``ResponseError`` means: ``_FULL``, ``_REFUSED``, ``_MOVING``, or
    None for an error like any other (raised as usual)."""
    errors = redis.exceptions
    text = str(exc)
    # redis-py strips the codes it knows from the text (and keeps them as status_code).
    code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
    # Redis 6 reports OOM inside a script as "ERR Error running script ... -OOM ...".
    if isinstance(exc, errors.OutOfMemoryError) or "OOM command not allowed" in text:
        return _FULL
    if isinstance(exc, errors.TryAgainError):
        return _MOVING
    if code in _TRANSIENT_CODES or isinstance(
        exc, (errors.ReadOnlyError, errors.ClusterDownError, errors.MasterDownError, errors.ExecAbortError)
    ):
        return None
    if isinstance(exc, (errors.NoPermissionError, errors.ClusterCrossSlotError)):
        return _REFUSED
    lowered = text.lower()
    return _REFUSED if any(w in lowered for w in _REFUSAL_WORDS) else None


def _staging_name(name: bytes, prefix: bytes) -> bytes | None:
    """A fresh staging name for ``name``: under ``prefix``, in ``name``'s cluster slot.

    RENAME and the publish script need both names in one slot. A name with a hash tag
    keeps it (staging = name + mark); one without gets ``{name}`` after the prefix,
    which hashes like the name itself unless the name holds a ``}`` or the prefix a
    ``{`` (then None: a plain SET).
    """
    token = STAGING_MARK + os.urandom(8).hex().encode("ascii")
    start = name.find(b"{")
    end = name.find(b"}", start + 1) if start != -1 else -1
    if end > start + 1:  # a non-empty tag: the first "{" and the first "}" after it
        return name + token  # the same first tag: the same slot
    if b"}" in name or b"{" in prefix:
        return None
    return prefix + b"{" + name + b"}" + token


class _ChunkValuePacker:
    """redis-py command packer that sends ``ChunkValue`` arguments without joining them.

    A ``chunk_format.UnsealedChunk`` is packed lazily: its payload pieces are hashed
    as redis-py's send loop takes them (a retried send packs, so hashes, again). Other commands go
    to redis-py's own packer. Stateless, so one instance serves every connection of
    every thread.
    """

    def __init__(self) -> None:
        from redis._parsers.encoders import Encoder
        from redis.connection import PythonRespSerializer

        self._encode = Encoder("utf-8", "strict", False).encode
        self._plain = PythonRespSerializer(6000, self._encode)

    def pack(self, *args: Any) -> Iterable[bytes | memoryview]:
        # A loop, not any() over a generator: one it leaves unfinished is closed as it is
        # freed, and an interrupt landing in that close is ignored by Python (a lost Ctrl-C).
        for a in args:
            if type(a) is ChunkValue or isinstance(a, chunk_format.UnsealedChunk):
                break
        else:
            return self._plain.pack(*args)  # type: ignore[no-any-return]
        if isinstance(args[0], str) and " " in args[0]:
            args = tuple(args[0].encode().split()) + args[1:]
        out: list[bytes | memoryview] = []
        lazy: list[Iterable[bytes | memoryview]] = []
        buff = b"*%d\r\n" % len(args)
        for arg in args:
            if type(arg) is ChunkValue:
                out.append(buff + b"$%d\r\n" % arg.nbytes)
                out.extend(arg.parts)
                buff = b"\r\n"
            elif isinstance(arg, chunk_format.UnsealedChunk):
                out.append(buff + b"$%d\r\n" % arg.size + arg.header)
                lazy += [out, arg.pieces(STREAM_PIECE_BYTES)]
                out = []
                buff = b"\r\n"
            else:
                enc = self._encode(arg)
                buff += b"$%d\r\n" % len(enc) + bytes(enc) + b"\r\n"
        out.append(buff)
        return itertools.chain.from_iterable(lazy + [out]) if lazy else out


def _pool_class(hooks: dict[str, Any], base: type) -> type:
    """A ``base`` pool that gives its connections ``hooks`` (for cluster node clients)."""

    class HookedConnectionPool(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{**kwargs, **hooks})

    return HookedConnectionPool


@functools.lru_cache(maxsize=1)
def _waiting_pool_class() -> type:
    """redis-py's ConnectionPool, except that at ``max_connections`` a caller waits for a
    connection to come free (up to the socket timeout) instead of failing at once.

    redis-py's own raises ``MaxConnectionsError``, a ``ConnectionError``: more callers
    than connections read as an outage of a healthy server (misses, failed puts,
    retries and strikes against the circuit; a cluster client re-reads its topology).
    ``redis.BlockingConnectionPool`` waits too, but keeps its connections in a queue
    that ``_take_open_connection`` cannot use. Thread-safe and fork-safe as redis-py's
    pool (``reset`` after a fork makes a new condition too).
    """
    import redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import MaxConnectionsError

    def pool_full(exc: Exception) -> bool:
        # redis-py 5.x's pool raises a plain ConnectionError("Too many connections");
        # later ones its subclass MaxConnectionsError.
        return isinstance(exc, MaxConnectionsError) or str(exc) == "Too many connections"

    class WaitingConnectionPool(redis.ConnectionPool):  # type: ignore[misc]
        def reset(self) -> None:
            # Also run by __init__ and after a fork (a condition a parent thread held
            # at fork() would stay held in the child).
            # Entered through the plain lock (C-level __enter__): a KeyboardInterrupt in
            # Condition.__enter__ (Python) could leave it held, and every release() hung.
            self._room_lock = threading.Lock()
            self._room = threading.Condition(self._room_lock)
            self._freed = 0  # connections released so far: a waiter wakes on a change
            super().reset()

        def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + float(self.connection_kwargs.get("socket_timeout") or 5.0)
            while True:
                freed = self._freed
                try:
                    return super().get_connection(*args, **kwargs)
                except RedisConnectionError as exc:
                    if not pool_full(exc):
                        raise
                    with self._room_lock:
                        while self._freed == freed:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                raise
                            self._room.wait(left)

        def release(self, connection: Any) -> None:
            super().release(connection)
            with self._room_lock:
                self._freed += 1
                self._room.notify()

    return WaitingConnectionPool


_HOOKS: dict[int, dict[str, Any]] = {}
_HOOKS_LOCK = threading.Lock()


def _fast_path_hooks(protocol: int) -> dict[str, Any]:
    """Connection kwargs for the zero-copy put and the recv_into reply buffer.

    Returns ``{}`` (stock redis-py) where its internals are not what we expect.
    """
    with _HOOKS_LOCK:
        if protocol not in _HOOKS:
            _HOOKS[protocol] = _build_hooks(protocol)
        return dict(_HOOKS[protocol])


@functools.lru_cache(maxsize=1)
def _streaming_send_loop() -> bool:
    """Whether redis-py sends a packed command by iterating over it once, piece by piece.

    A staged put packs its payload as a generator that hashes each piece as the send
    loop takes it; a redis-py that joined or measured the packed command first would
    break that, so staging needs this (else puts hash first, as before).
    """
    try:
        from redis.connection import AbstractConnection

        source = inspect.getsource(AbstractConnection.send_packed_command)
    except (ImportError, AttributeError, OSError, TypeError) as exc:
        logger.debug("staged puts off: cannot read redis-py's send loop (%r)", exc)
        return False
    found = "for item in command:" in source and "sendall(item)" in source
    if not found:
        logger.debug("staged puts off: redis-py's send loop is not the one they were built for")
    return found


@functools.lru_cache(maxsize=1)
def _redis_py_fits_inline_puts() -> bool:
    """Whether redis-py has what ``put_chunk_by`` relies on: a per-call ``read_response``
    timeout, and the pool internals ``_take_open_connection`` uses."""
    try:
        from redis.connection import AbstractConnection, ConnectionPool

        pool = ConnectionPool()
        return (
            "timeout" in inspect.signature(AbstractConnection.read_response).parameters
            and "timeout" in inspect.signature(AbstractConnection.can_read).parameters
            and all(hasattr(pool, a) for a in ("_lock", "_available_connections", "_in_use_connections", "_checkpid"))
        )
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the call's deadline passed")
    return left


def _take_open_connection(pool: Any, redis: Any) -> Any | None:
    """An idle pooled connection that is open and has nothing to read, taken out of the
    pool as ``get_connection()`` hands one out; None when there is none.

    Unlike ``get_connection()`` it never connects. A connection the server has closed
    (a restart) reads as EOF here and is dropped instead. Uses the pool's private
    ``_lock``, ``_available_connections`` and ``_in_use_connections`` (``puts_inline``
    is off where they are missing).
    """
    pool._checkpid()
    conn = None
    try:
        with pool._lock:
            idle = pool._available_connections
            for i in range(len(idle) - 1, -1, -1):
                if getattr(idle[i], "_sock", None) is not None:
                    conn = idle[i]
                    del idle[i]  # no call between taking it and counting it in use
                    pool._in_use_connections.add(conn)
                    break
            else:
                return None
        try:
            stale = conn.can_read(timeout=0)  # a reply nobody read, or the server's EOF
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            stale = True
    except BaseException:  # a KeyboardInterrupt: the connection goes back, closed
        if conn is not None:
            _give_back(pool, conn, False)
        raise
    if stale:
        _give_back(pool, conn, False)
        return None
    return conn


def _give_back(pool: Any, conn: Any, clean: bool) -> None:
    """Return a connection ``_take_open_connection`` took; one not ``clean`` (a command
    half sent, a reply not read) is closed first.

    Closed, then released: a KeyboardInterrupt landing in the close leaves it out of
    the pool for good (a connection lost), never in it with a reply the next user
    would read as its own (released first, or released by a ``finally`` that ran
    after an interrupted close, it gave later calls the previous call's reply).
    """
    if not clean:
        conn.disconnect()
    pool.release(conn)


def _give_back_unless_released(pool: Any, conn: Any) -> None:
    """``_give_back`` of a connection not known clean, after one was interrupted (the
    caller's ``finally``: the interrupt landed at the call, before any of it ran): unless
    it got as far as taking the connection out of the pool's in-use set."""
    with pool._lock:
        in_use = conn in pool._in_use_connections
    if in_use:
        _give_back(pool, conn, False)


def _send_by(conn: Any, parts: Iterable[bytes | memoryview], deadline: float) -> None:
    """Send ``parts`` back to back on ``conn``'s socket, each wait bounded by the time left.

    One ``sendmsg`` gathers them all where the socket can (TLS sockets cannot: there,
    one ``send`` per part). The socket's own timeout is put back once all is sent.
    """
    sock = conn._sock
    if sock is None:  # ensure_connection() connected it; a concurrent disconnect did not
        raise ConnectionError("connection closed before sending")
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    gather = type(sock) is socket.socket  # not an ssl.SSLSocket (no sendmsg)
    while views:
        sock.settimeout(_time_left(deadline))
        try:
            sent = sock.sendmsg(views) if gather else sock.send(views[0])
        except TimeoutError as exc:
            if exc.errno is not None:  # ETIMEDOUT: the kernel gave up on the peer (dead, not slow)
                # Not chained: the backend reads a TimeoutError anywhere in the chain as "slow".
                raise ConnectionError(exc.errno, f"the connection died: {exc.strerror}") from None
            raise
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0
    sock.settimeout(conn.socket_timeout)


def _as_flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError(f"{name}: expected true or false, got {value!r:.40}")


def _build_hooks(protocol: int) -> dict[str, Any]:
    hooks: dict[str, Any] = {}
    try:
        from redis.connection import AbstractConnection

        if "command_packer" in inspect.signature(AbstractConnection.__init__).parameters:
            hooks["command_packer"] = _ChunkValuePacker()
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    try:
        hooks["parser_class"] = _large_reply_parser(protocol)
    except (ImportError, AttributeError):
        pass
    return hooks


def _reply_pool() -> BufferPool:
    """The process's warm buffers for large replies (shared by every connection).

    At most ``REPLY_POOL_BYTES`` stay retained for the life of the process.
    """
    return shared_pool("redis-replies", REPLY_POOL_BYTES)


# The ArrivingPayload of a get_hashed running on this thread, for LargeReplyBuffer: the
# reply is read deep inside redis-py's command call, where no argument reaches. Also
# the deadline (get_hashed_by's, or _call's) that bounds every read of a large reply.
_arriving = threading.local()


def _large_reply_parser(protocol: int) -> type:
    from redis._parsers.resp2 import _RESP2Parser
    from redis._parsers.resp3 import _RESP3Parser
    from redis._parsers.socket import SENTINEL, SERVER_CLOSED_CONNECTION_ERROR, SocketBuffer
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import InvalidResponse
    from redis.exceptions import TimeoutError as RedisTimeoutError

    class LargeReplyBuffer(SocketBuffer):  # type: ignore[misc]
        """SocketBuffer whose large bulk reads land in one pooled buffer, copied once.

        Under ``get_hashed`` it also feeds the chunk's ``ArrivingPayload`` as the bytes come.
        """

        def read(self, length: int, timeout: Any = SENTINEL) -> Any:
            if length < LARGE_REPLY_BYTES:
                return super().read(length, timeout)
            total = length + 2  # the value and its CRLF
            # A warm buffer from the pool, not bytearray(n) (which zero-fills: as much
            # as the network read itself for a 32 MiB chunk) nor numpy.empty (fresh
            # pages: faults, or compaction stalls for huge pages once the page cache
            # has fragmented memory). 32 MiB GETs: ~0.65 -> ~0.72 GB/s on a 2-core VM.
            array: Any = _reply_pool().acquire(total).numpy()  # a buffer; numpy's stubs do not say so
            view = memoryview(array).cast("B")
            payload = getattr(_arriving, "payload", None)  # get_hashed's, on this thread
            if payload is not None:
                payload.start(view)
            got = self._buffer.readinto(view)  # whatever redis-py already buffered
            sock = self._sock
            custom = timeout is not SENTINEL
            if custom:
                sock.settimeout(timeout)
            deadline = getattr(_arriving, "deadline", None)  # the whole call's (get_hashed_by, _call)
            try:
                while got < total:
                    if payload is not None:
                        payload.arrived(min(got, length))
                    if deadline is not None:
                        custom = True
                        sock.settimeout(_time_left(deadline))
                    n = sock.recv_into(view[got:])
                    if n == 0:
                        raise RedisConnectionError(SERVER_CLOSED_CONNECTION_ERROR)
                    got += n
                if payload is not None:
                    payload.arrived(length)
            except TimeoutError:  # socket.timeout is TimeoutError since 3.10
                raise RedisTimeoutError("Timeout reading from socket") from None
            except OSError as exc:
                raise RedisConnectionError(f"Error while reading from socket: {exc.args}") from None
            finally:
                if custom:
                    sock.settimeout(self.socket_timeout)
            if view[length:] != b"\r\n":
                raise InvalidResponse("Protocol Error: bulk reply without CRLF")
            value = view[:length]
            if payload is not None:
                payload.finish(value)
            return value

    base = _RESP3Parser if protocol == 3 else _RESP2Parser

    class LargeReplyParser(base):  # type: ignore[misc, valid-type]
        def on_connect(self, connection: Any) -> None:
            super().on_connect(connection)
            self._buffer = LargeReplyBuffer(self._sock, self.socket_read_size, connection.socket_timeout)

    return LargeReplyParser
