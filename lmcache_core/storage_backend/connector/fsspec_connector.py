"""Chunk bytes in any fsspec filesystem: S3 (and MinIO/Ceph), GCS, Azure, local, memory.

Objects live at ``<prefix>/`` + ``layout.key_to_path(key)``, the same layout as
the disk tier, so a store can be listed per model by prefix and copied with
ordinary tools. Batched reads and writes use fsspec's batch ``cat``/``pipe``,
which async filesystems (s3fs, gcsfs, adlfs) run concurrently.

Writes are atomic: object stores publish an object only when its single PUT
completes; local directories get a temp name and ``os.replace``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
import types
from datetime import datetime
from typing import Any, Awaitable, BinaryIO, Callable, Iterator, Sequence, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from lmcache_core import chunk_format, layout
from lmcache_core.config import mask_url
from lmcache_core.errors import CorruptChunkError, StoreFullError, StoreUnavailableError
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import disk_io
from lmcache_core.storage_backend.connector import s3_checksum
from lmcache_core.storage_backend.connector.base import CHUNK_OBJECT_BYTES, RemoteConnector, RemoteObject
from lmcache_core.storage_backend.mem_pool import shared_pool

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

# s3fs splits bodies of 2 * chunksize or more into a multipart upload; we raise
# chunksize with the body so every chunk is one PUT (atomic, one round trip)
# up to S3's 5 GiB single-PUT limit.
_S3_DEFAULT_CHUNKSIZE = 50 * 2**20
# S3 bodies up to this size are joined into one bytes; larger ones are sent from the
# tensor's memory through PartsReader. aiohttp reads a file body on an executor
# thread 256 KiB at a time and botocore hashes it (CRC32, SigV4) from 1 MiB reads,
# which costs more than one copy for small bodies: 2 MiB PUTs to moto on loopback
# ran at 0.88x raw s3fs pipe_file through the reader, 0.99x joined; at 16-32 MiB
# the two were level, and a join there is a fresh 32 MiB allocation per put.
_S3_JOIN_BODY_BYTES = 8 * 2**20
# Connections per S3 client: enough for a pipelined batch of 16 plus puts.
_S3_POOL_CONNECTIONS = 32
#: A PUT on an async filesystem is given up (its connection closed) after this many
#: store timeouts. Its socket timeouts do not bound it: aiohttp waits for the "100
#: Continue" botocore asks for before sending a body with no timer at all, so a server
#: that took the headers and went silent (or an HTTP/1.0 server or proxy, which never
#: sends one) held the PUT, its I/O thread and its pooled connection for good. Every
#: caller has given up by one timeout; the second leaves it the first word.
PUT_LIMIT_TIMEOUTS = 2.0
#: A GET (and a batch's each GET) on an async filesystem is given up after this many
#: store timeouts. The client's read timeout bounds each socket read, not the body: a
#: server or proxy that trickled a 4 MiB reply 1 MiB every 0.4 s (each read well within
#: a 0.5 s timeout) held the GET, its I/O thread and its pooled connection until the
#: last byte, long after every caller had given up; one trickling at a few bytes a
#: second would hold them for days.
GET_LIMIT_TIMEOUTS = 2.0
#: Bytes one ``get_many`` keeps in flight (see ``FsspecConnector.get_many``).
BATCH_BUDGET_BYTES = 64 * 2**20
#: Seconds an S3 bucket seen to exist is taken to exist: ``exists`` asks again (one more
#: GET after a HEAD's 404, which cannot tell a missing key from a missing bucket) at
#: most this often, so a miss costs one HEAD and a deleted bucket is noticed this late.
BUCKET_RECHECK_S = 30.0
#: S3 bodies at least this long are read into warm pooled buffers (``_get_pooled``).
POOLED_BODY_BYTES = 256 * 1024
#: Most bytes of warm body buffers a process keeps: one ``batched_get`` of sixteen 32 MiB
#: chunks (each with its header). With half that, every such batch paged in eight fresh
#: buffers: 0.60-0.68 s per batch on a 2-core VM, against 0.47-0.54 s with fifteen warm.
BODY_POOL_BYTES = 16 * CHUNK_OBJECT_BYTES
_BOOL_OPTIONS = {"anon", "use_ssl", "requester_pays", "version_aware"}
# Also botocore's (and the AWS CLI's) names: passed on as they were, s3fs handed them to
# aiobotocore's session, and every call failed as "store unavailable: TypeError".
_S3_ALIASES = {
    "region": "region_name",
    "access_key": "key",
    "secret_key": "secret",
    "aws_access_key_id": "key",
    "aws_secret_access_key": "secret",
    "aws_session_token": "token",
}
# Filesystems whose constructor takes the socket timeout as ``timeout`` (FTP's default
# is 30 s, SMB's 60 s): they get the store's.
_TIMEOUT_OPTION_PROTOCOLS = frozenset({"ftp", "sftp", "smb"})
# Filesystems over one session whose commands must not interleave (ftplib's control
# connection, an SSH channel): each thread gets a client of its own.
_PER_THREAD_PROTOCOLS = frozenset({"ftp", "sftp"})
# What a single-session client runs: after any of these fails, the thread's session is
# dropped and the next call logs in afresh. fsspec's FTP client never reconnects after a
# failed command, so one that the server closed for idling (300 s by default on vsftpd
# and pyftpdlib) failed every later call on that thread, with the retries too.
_SESSION_CALLS = ("open_stream", "get", "get_many", "get_head", "exists", "put", "put_many", "delete", "list", "list_rank")
# Filesystems of directories whose write is no single atomic PUT (FTP's STOR and SFTP
# write in place, and need the directory to exist): a put writes a temp name in the
# chunk's directory, made when missing, then renames it over the chunk (FTP's RNTO and
# SFTP's posix-rename replace an existing chunk). SMB and HDFS stay out: their renames
# refuse an existing target, so every put of a stored key would fail.
_RENAME_PUT_PROTOCOLS = frozenset({"ftp", "sftp"})


class PartsReader(io.RawIOBase):
    """A seekable read-only file over several buffers, without joining them.

    botocore accepts ``bytes`` or a file object as a request body but not a
    ``memoryview``; this hands it the header and the tensor's own memory, so a
    32 MiB chunk is not copied into one ``bytes`` first. Not thread-safe (one
    request reads it).
    """

    def __init__(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        super().__init__()
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._size = sum(p.nbytes for p in self._parts)
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        written = 0
        start = 0  # offset of the current part in the whole body
        for part in self._parts:
            end = start + part.nbytes
            if self._pos < end and written < out.nbytes:
                lo = self._pos - start
                n = min(part.nbytes - lo, out.nbytes - written)
                out[written : written + n] = part[lo : lo + n]
                written += n
                self._pos += n
            start = end
        return written


def _parse_query(query: str) -> dict[str, Any]:
    """A URL's query as filesystem options: booleans parsed, and a ``*_kwargs`` value
    written as a JSON object (``?config_kwargs={"s3":{"addressing_style":"path"}}``)
    made the mapping fsspec wants (as a string it failed with "dictionary update
    sequence element #0 has length 1")."""
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _BOOL_OPTIONS:
            options[name] = value.strip().lower() in ("1", "true", "yes", "on")
        elif name.endswith("_kwargs"):
            options[name] = _json_object(name, value)
        else:
            options[name] = value
    return options


def _json_object(name: str, value: str) -> dict[str, Any]:
    """``value`` parsed as a JSON object; the error names the option, never the value
    (it may hold a secret: ``client_kwargs={"aws_secret_access_key": ...}``)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"URL option {name} must be a JSON object such as {{\"region_name\": \"us-east-1\"}}: "
            f"{exc.msg} at character {exc.pos}"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"URL option {name} must be a JSON object, got a JSON {type(parsed).__name__}")
    return parsed


def _url_options(cls: Any, url: str) -> dict[str, Any]:
    """What the filesystem class ``cls`` takes from ``url`` (without its query): FTP's,
    SFTP's, WebHDFS' ``host``, ``port``, user and password. fsspec's own ``url_to_fs``
    passes these; without them ``FTPFileSystem()`` failed ("missing 1 required positional
    argument: 'host'"). A user name or password is percent-decoded, as a URL's userinfo
    is written encoded (``p%40ss`` for ``p@ss``)."""
    try:
        options = dict(cls._get_kwargs_from_urls(url) or {})
    except Exception as exc:  # a class that cannot parse it: the URL is refused
        raise ValueError(f"{mask_url(url)}: not a URL this filesystem reads ({type(exc).__name__})") from None
    for name in ("username", "user", "password"):
        if isinstance(options.get(name), str):
            options[name] = unquote(options[name])
    return options


def _is_invalid_range(exc: BaseException) -> bool:
    """S3's answer to a range past the object's end (InvalidRange, HTTP 416).

    Our reads start at byte 0 to save a HEAD, so a 0-byte object answers this
    way: the server is fine, the object is just empty (a corrupt chunk).
    """
    cause = exc.__cause__ or exc.__context__
    error = getattr(cause, "response", None)
    if isinstance(error, dict) and error.get("Error", {}).get("Code") == "InvalidRange":
        return True
    return "range is not satisfiable" in str(exc).lower()


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``), a few deep."""
    for _ in range(8):  # a bound: a cycle of causes must not loop forever
        if exc is None:
            return
        yield exc
        exc = exc.__cause__


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, ...), else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = (response.get("Error") or {}).get("Code")
    return None if code is None else str(code)


def _missing_bucket(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is S3's ``NoSuchBucket``."""
    return any(_error_code(e) == "NoSuchBucket" for e in _causes(exc))


def _is_miss(exc: BaseException) -> bool:
    """Whether ``exc`` says that the object is not there: a miss, not a store that failed.

    ``FileNotFoundError`` alone does not say so. s3fs raises it for a missing *bucket*
    (``NoSuchBucket``), which made a mistyped bucket an empty store; fsspec's HTTP
    ``info`` raises it for any failure at all, a refused connection included. Both
    keep the real error as the ``__cause__``, which decides: S3's ``NoSuchBucket``, an
    HTTP status other than 404/410, a transport error (an ``OSError`` other than
    ``FileNotFoundError``: refused, reset, timed out, denied) or an aiohttp error make
    it no miss. Other causes (the memory filesystem's ``KeyError``) are misses.
    """
    if not isinstance(exc, FileNotFoundError):
        return False
    aiohttp = sys.modules.get("aiohttp")  # not loaded: none of its errors can be here
    for cause in _causes(exc.__cause__):
        code = _error_code(cause)
        if code is not None:
            return code != "NoSuchBucket"
        status = getattr(cause, "status", None)  # aiohttp's ClientResponseError
        if isinstance(status, int):
            return status in (404, 410)
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            return False
        if aiohttp is not None and isinstance(cause, aiohttp.ClientError):
            return False
    return True


async def _read_exactly(body: Any, view: memoryview, check: Any = None) -> None:
    """Fill ``view`` from an S3 body (feeding ``check`` in order); a short body raises."""
    got = 0
    while got < view.nbytes:
        n = await body.readinto(view[got:])
        if not n:  # a guard: aiohttp (or botocore's length check) raises first
            raise OSError(f"short body: {got} of {view.nbytes} bytes")
        if check is not None:
            check.update(view[got : got + n])
        got += n


async def _chunk_head(body: Any, size: int, path: str) -> tuple[bytes, bool]:
    """The chunk header at the start of an S3 body of ``size`` bytes, and whether it is
    a chunk's of exactly that size (``chunk_format.parse_header``).

    Read before the body's buffer is allocated: an object that is no chunk, or whose
    Content-Length is not header + payload, is refused without reading the rest (a
    planted 1.5 GiB of zeros took 5.9 s and 1.8 GiB of memory to be found "header
    length 0"). The header is bounded (``chunk_format.MAX_HEADER_BYTES``).
    """
    buf = bytearray(8)
    await _read_exactly(body, memoryview(buf))
    head = bytes(buf)
    try:
        end = chunk_format.header_length(head)
        if end <= size:
            buf = bytearray(end - 8)
            await _read_exactly(body, memoryview(buf))
            head += buf
        chunk_format.parse_header(head, total_size=size)
    except CorruptChunkError as exc:
        logger.warning("%s: not a chunk (%s); its %d bytes were not read", path, exc, size)
        return head, False
    return head, True


def _pooled_gets(cls: Any) -> bool:
    """Whether the filesystem class ``cls`` is s3fs with the calls ``_get_pooled`` uses."""
    return bool(getattr(cls, "async_impl", False)) and callable(getattr(cls, "_call_s3", None))


async def _get_head(fs: Any, path: str, nbytes: int) -> tuple[bytes, int]:
    """The first ``nbytes`` of an S3 object and its size, from one ranged GET."""
    bucket, key, version = fs.split_path(path)
    extra = dict(getattr(fs, "req_kw", None) or {})  # as _get_pooled
    if version:
        extra["VersionId"] = version
    try:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{max(nbytes, 1) - 1}", **extra)
    except OSError as exc:
        # A 0-byte object answers every range with InvalidRange: a short object, not
        # an outage, and it must not count against the breaker.
        if _is_invalid_range(exc):
            return b"", 0
        raise
    body = resp["Body"]
    try:
        data = bytes(await body.read())
    finally:
        body.close()
    # "bytes 0-4095/1048700"; a server that ignores the range sends the whole object.
    total = str(resp.get("ContentRange") or "").rpartition("/")[2]
    size = int(total) if total.isdigit() else len(data)
    if size < len(data):
        raise OSError(f"S3 GET of {path}: Content-Range {resp.get('ContentRange')!r} is shorter than its body")
    return data[:nbytes], size


async def _get_pooled(fs: Any, path: str) -> bytes | memoryview:
    """One S3 GET whose body, when large, lands in a warm pooled buffer.

    ``cat_file`` returns ``b"".join`` of the body's pieces: a fresh 32 MiB
    allocation per chunk, whose page faults cost more than the copy (profiled:
    ~40 % of the event loop thread's time in a batch of 16 x 32 MiB). Here each
    piece is copied once into a buffer from the process's body pool, returned as
    a writable ``memoryview`` that the caller owns until it drops it (as the
    Redis connector's large replies). A short body raises (botocore checks the
    length), so a truncated reply is an error to retry, never a shorter chunk;
    so does a body that fails S3's checksum, checked as it arrives
    (``s3_checksum``).
    """
    bucket, key, version = fs.split_path(path)
    # req_kw (RequestPayer for requester_pays): s3fs adds it inside _call_s3 only
    # since 2025; older ones left it to each caller, as cat_file did.
    extra = dict(getattr(fs, "req_kw", None) or {})
    if version:
        extra["VersionId"] = version
    ours = await s3_checksum.ask_for_checksums(fs, bucket)
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
    body = resp["Body"]
    try:
        expected = s3_checksum.expected_checksum(resp) if ours else None
        check = s3_checksum.BodyCheck(expected, path) if expected is not None else None
        size = int(resp.get("ContentLength") or 0)
        if size < POOLED_BODY_BYTES or not hasattr(body, "readinto"):
            data = bytes(await body.read())
            if check is not None:
                check.update(data)
                check.verify()
            return data
        head, whole = await _chunk_head(body, size, path)
        if not whole:
            # What was read: the backend's decode finds it no chunk and counts a
            # corrupt miss, as it did for the whole object.
            return head
        array: Any = shared_pool("s3-bodies", BODY_POOL_BYTES).acquire(size).numpy()  # a buffer
        view = memoryview(array).cast("B")
        view[: len(head)] = head
        if check is not None:
            check.update(view[: len(head)])
        await _read_exactly(body, view[len(head) : size], check)
        # Read to the end: that is where botocore checks the length it counted.
        if await body.read():
            raise OSError(f"body longer than its Content-Length of {size} bytes")
        if check is not None:
            check.verify()
        return view
    finally:
        body.close()


async def _get_pooled_many(fs: Any, paths: Sequence[str], in_flight: int, limit: float) -> list[Any]:
    """``_get_pooled`` of every path, ``in_flight`` at a time, each given up after ``limit``
    seconds (waiting for its turn is not counted); exceptions returned in place."""
    import asyncio

    gate = asyncio.Semaphore(in_flight)

    async def one(path: str) -> bytes | memoryview:
        async with gate:
            return await _within(limit, f"GET of {path}", _get_pooled(fs, path))

    return list(await asyncio.gather(*(one(p) for p in paths), return_exceptions=True))


async def _within(limit: float, what: str, work: Awaitable[_T]) -> _T:
    """``work``'s result, or ``TimeoutError("<what>: no answer within <limit> s")`` once
    ``limit`` seconds have passed (``work`` is cancelled: its connection is closed)."""
    import asyncio

    started = asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(work, limit)
    except asyncio.TimeoutError as exc:
        if asyncio.get_running_loop().time() - started < limit - 0.001:  # (the loop may fire a hair early)
            raise  # the client's own (a socket timeout): it names what timed out
        raise TimeoutError(f"{what}: no answer within {limit:g} s") from exc


def _run_within(fs: Any, limit: float, what: str, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """``fn(*args)`` run on ``fs``'s event loop and given up after ``limit`` seconds."""
    from fsspec.asyn import sync

    try:
        return sync(fs.loop, _within, limit, what, fn(*args))  # type: ignore[no-any-return]
    except TimeoutError as exc:
        raise _named_timeout(exc, f"{what}: no answer within {limit:g} s") from exc.__cause__


def _named_timeout(exc: TimeoutError, fallback: str) -> TimeoutError:
    """fsspec's ``sync`` turns every TimeoutError into a bare ``FSTimeoutError()``: the
    one that says what timed out, from its cause, else ``fallback``."""
    cause = exc.__cause__
    return TimeoutError(str(cause) if cause is not None and str(cause) else fallback)


async def _pipe_bounded(
    fs: Any, bodies: dict[str, Any], limit: float, check: Callable[[str, Any], None], **kwargs: Any
) -> None:
    """``fs._pipe_file`` of every body, at most ``_S3_POOL_CONNECTIONS`` at once, each
    given up after ``limit`` seconds (``PUT_LIMIT_TIMEOUTS``) and its reply passed to
    ``check(path, reply)``; the first failure raises once all have ended."""
    import asyncio

    gate = asyncio.Semaphore(_S3_POOL_CONNECTIONS)  # waiting for a connection is no PUT's time

    async def one(path: str, body: Any) -> None:
        async with gate:
            check(path, await _within(limit, f"PUT of {path}", fs._pipe_file(path, body, **kwargs)))

    results = await asyncio.gather(*(one(p, b) for p, b in bodies.items()), return_exceptions=True)
    error = next((r for r in results if isinstance(r, BaseException)), None)
    if error is not None:
        raise error


def _log_out(fs: Any) -> None:
    """Close a single-session client's connection (FTP's ``ftp``, SFTP's ``ftp`` and
    ``client``), best effort: it may be dead already."""
    for name in ("ftp", "client"):
        close = getattr(getattr(fs, name, None), "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001 - a dead session has nothing to close
                pass


def _timestamp(info: dict[str, Any]) -> float | None:
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class FsspecConnector(RemoteConnector):
    """Bytes by key in an fsspec filesystem under a URL prefix.

    Args:
        url: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``memory://name``,
            ``file:///dir`` or ``fsspec+<protocol>://...``. Query parameters
            (``?endpoint_url=...&region=...``) are options too; keyword options win.
        timeout: seconds for the client's connect and read timeouts (S3).
        **options: filesystem options. For S3: ``endpoint_url``, ``key``,
            ``secret``, ``token``, ``region`` (or ``region_name``), ``profile``,
            ``client_kwargs``, ``config_kwargs`` and anything ``S3FileSystem``
            takes; unset ones come from the environment and AWS profile as usual.

    Raises:
        ValueError: a URL without a bucket/prefix where one is needed.
        ImportError: the protocol's package (s3fs, gcsfs, adlfs) is missing.

    Thread-safe; fork-safe (a child process opens its own filesystem client).
    """

    def __init__(self, url: str, *, timeout: float, **options: Any) -> None:
        import fsspec

        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        protocol = scheme.removeprefix("fsspec+")
        if protocol == "s3a":  # Hadoop's spelling of the same store
            protocol = "s3"
        self.protocol = protocol
        # mask_url re-joins the URL and would turn file:///x into file:/x; only
        # URLs that can hold a secret (userinfo, query) need it.
        self.display_url = mask_url(url) if ("@" in url or "?" in url) else url
        self._cls = fsspec.get_filesystem_class(protocol)
        plain = f"{protocol}://{parts.netloc}{parts.path}"
        # The URL's own (host, port, user, password), then its query, then keywords.
        merged = _url_options(self._cls, plain)
        merged.update(_parse_query(parts.query))
        merged.update(options)
        if protocol in _TIMEOUT_OPTION_PROTOCOLS:
            merged.setdefault("timeout", float(timeout))
        root = self._cls._strip_protocol(plain)
        root = root.rstrip("/") if isinstance(root, str) else str(root)
        if protocol == "s3" and not root:
            raise ValueError(f"{self.display_url}: an S3 URL needs a bucket, e.g. s3://bucket/prefix")
        if protocol in ("file", "local"):
            if not root or root == "/":
                raise ValueError(f"{self.display_url}: needs a directory, e.g. file:///var/cache/lmcache")
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root
        self.timeout = float(timeout)
        self._get_limit = GET_LIMIT_TIMEOUTS * self.timeout
        # One decision for both: botocore's own GET check is off exactly when reads go
        # through _get_pooled, which checks S3's checksum itself.
        self._pooled = _pooled_gets(self._cls)
        self._fs_kwargs = self._filesystem_options(protocol, merged, self.timeout, checks_gets=self._pooled)
        self._local = protocol in ("file", "local")
        # Local files stream into the backend's warm buffers (LMCRemoteBackend._read_streams).
        self.streams = self._local
        # Where cat_file is used (S3 reads go through _get_pooled; this is for an
        # s3fs without _call_s3): a ranged GET from byte 0 skips the HEAD that s3fs
        # sends before a plain cat_file (one round trip instead of two per chunk).
        self._cat_kwargs: dict[str, Any] = {"start": 0} if protocol == "s3" else {}
        # Bytes one get_many keeps in flight (sized by the base class's value hint).
        self.batch_budget_bytes = BATCH_BUDGET_BYTES
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._bucket_seen = float("-inf")  # when (time.monotonic) the S3 bucket was last seen to exist
        self._thread_fs = threading.local()
        self._opener: int | None = threading.get_ident()
        self._sessions: list[Any] = []  # single-session clients opened (closed by close())
        self._fs = self._open()
        if self._local:
            os.makedirs(self.root, exist_ok=True)
        if self.protocol in _PER_THREAD_PROTOCOLS:
            for name in _SESSION_CALLS:
                setattr(self, name, self._dropping_session_on_failure(getattr(self, name)))

    @staticmethod
    def _filesystem_options(
        protocol: str, options: dict[str, Any], timeout: float, *, checks_gets: bool = False
    ) -> dict[str, Any]:
        opts = dict(options)
        # Other processes write the same store: a listing cache would hide their chunks.
        opts.setdefault("use_listings_cache", False)
        if protocol in ("http", "https"):
            # aiohttp's default is 300 s for the whole request: each call of a remote
            # that stopped answering held a backend I/O thread that long after its
            # caller gave up, and a server back from an outage was used again only
            # minutes later (235 s measured). Like S3's connect and read timeouts:
            # per connect and per socket read, so a large body may take longer.
            import aiohttp

            client_kwargs = dict(opts.pop("client_kwargs", None) or {})
            client_kwargs.setdefault(
                "timeout", aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
            )
            opts["client_kwargs"] = client_kwargs
            return opts
        if protocol != "s3":
            return opts
        for alias, name in _S3_ALIASES.items():
            if alias in opts:
                opts[name] = opts.pop(alias)
        client_kwargs = dict(opts.pop("client_kwargs", None) or {})
        if "region_name" in opts:
            client_kwargs["region_name"] = opts.pop("region_name")
        config_kwargs = dict(opts.pop("config_kwargs", None) or {})
        config_kwargs.setdefault("connect_timeout", timeout)
        config_kwargs.setdefault("read_timeout", timeout)
        config_kwargs.setdefault("max_pool_connections", _S3_POOL_CONNECTIONS)
        # Retries and backoff live in LMCRemoteBackend, one policy for every
        # connector; botocore's own retries would stack under its timeout.
        config_kwargs.setdefault("retries", {"total_max_attempts": 1})
        # _get_pooled checks GET bodies against S3's checksum itself, with a faster
        # CRC32 than botocore's (see s3_checksum); without it, botocore keeps checking.
        if checks_gets:
            for name, value in s3_checksum.config_defaults().items():
                config_kwargs.setdefault(name, value)
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        opts["config_kwargs"] = config_kwargs
        return opts

    def _open(self) -> Any:
        # fsspec's instance cache shares one client among connectors with the
        # same options (building an S3 client costs ~0.3 s); it is per process,
        # so a forked child gets its own.
        if self.protocol in _PER_THREAD_PROTOCOLS:
            # Not from fsspec's instance cache: a session this connector dropped as dead
            # must not come back from it, and close() may log every one out.
            fs = self._cls(skip_instance_cache=True, **self._fs_kwargs)
            with self._lock:
                self._sessions.append(fs)
            return fs
        fs = self._cls(**self._fs_kwargs)
        if self.protocol == "s3":
            fs.retries = 1  # s3fs retries with sleeps of its own; see config_kwargs
            try:
                # Build the client now (service model, credentials: ~0.3 s, no
                # request sent) so the first chunk's call does not spend its
                # timeout on it.
                fs.connect()
            except Exception:  # the first real call reports it, with its timeout
                logger.debug("%s: connecting failed", self.display_url, exc_info=True)
        return fs

    @property
    def fs(self) -> Any:
        """The filesystem client, reopened after a fork (async clients are per process);
        one per thread for single-session protocols (``_PER_THREAD_PROTOCOLS``)."""
        if self.protocol in _PER_THREAD_PROTOCOLS:
            mine = getattr(self._thread_fs, "fs", None)
            if mine is None or self._thread_fs.pid != os.getpid() or self._fs is None:
                # The opening thread's client is the one _open made in __init__.
                mine = self._fs if threading.get_ident() == self._opener and self._fs is not None else None
                if mine is None or self._pid != os.getpid():
                    mine = self._open()
                self._thread_fs.fs, self._thread_fs.pid = mine, os.getpid()
            return mine
        if self._pid != os.getpid() or self._fs is None:
            with self._lock:
                if self._pid != os.getpid() or self._fs is None:
                    self._fs = self._open()
                    self._pid = os.getpid()
        return self._fs

    def _dropping_session_on_failure(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call``, after whose failure (also while iterating a listing) this thread's
        session is dropped: the next call, a retry too, opens a new one."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                result = call(*args, **kwargs)
            except Exception as exc:
                self._drop_session(exc)
                raise
            return self._guarded_iter(result) if isinstance(result, types.GeneratorType) else result

        guarded.__doc__ = call.__doc__
        return guarded

    def _guarded_iter(self, items: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from items
        except Exception as exc:
            self._drop_session(exc)
            raise

    def _drop_session(self, exc: Exception) -> None:
        """Forget (and log out) this thread's session unless ``exc`` says nothing of it."""
        if isinstance(exc, (FileNotFoundError, ValueError)):  # a miss, a bad argument
            return
        mine = getattr(self._thread_fs, "fs", None)
        self._thread_fs.fs = None
        if mine is None:
            return
        with self._lock:
            if mine is self._fs:
                self._opener = None  # the opening thread must not pick it up again either
            self._sessions = [fs for fs in self._sessions if fs is not mine]  # equal is not same
        _log_out(mine)

    def path(self, key: CacheEngineKey) -> str:
        """The object's full path in the filesystem (without protocol)."""
        return f"{self.root}/{layout.key_to_path(key)}"

    def _raise_unless_miss(self, exc: FileNotFoundError) -> None:
        """Return when ``exc`` is a plain miss (``_is_miss``); else raise what it really is."""
        if not _is_miss(exc):
            raise self._not_a_miss(exc) from exc

    def _not_a_miss(self, exc: BaseException) -> Exception:
        """The error to raise for a ``FileNotFoundError`` that ``_is_miss`` says is no miss.

        A missing bucket is the store itself missing: reads and listings must fail
        (the backend counts the remote unavailable), not answer "no chunks".
        """
        if _missing_bucket(exc):
            bucket = self.root.split("/", 1)[0]
            return StoreUnavailableError(self.display_url, f"bucket {bucket!r} does not exist (NoSuchBucket)")
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        return OSError(f"{type(cause).__name__}: {cause}")  # the backend names the store

    # -- reads ---------------------------------------------------------------------

    def open_stream(self, key: CacheEngineKey) -> BinaryIO | None:
        if not self._local:
            raise NotImplementedError(f"{self.display_url}: only local directories stream")
        try:
            return open(self.path(key), "rb", buffering=0)
        except FileNotFoundError:
            return None

    def get(self, key: CacheEngineKey) -> bytes | None:
        """The object's bytes (a pooled ``memoryview`` for large S3 bodies), or None when absent."""
        fs = self.fs
        path = self.path(key)
        if self._pooled:
            try:
                value: Any = _run_within(fs, self._get_limit, f"GET of {path}", _get_pooled, fs, path)
            except FileNotFoundError as exc:
                self._raise_unless_miss(exc)
                return None
            self.learn_value_sizes((value,))
            return value
        try:
            data = self._bounded(f"GET of {path}", fs.cat_file, path, **self._cat_kwargs)
        except FileNotFoundError as exc:
            self._raise_unless_miss(exc)
            return None
        except OSError as exc:
            if _is_invalid_range(exc):
                return b""  # a 0-byte object (see _is_invalid_range): a bad chunk, not an outage
            raise
        data = bytes(data) if not isinstance(data, bytes) else data
        self.learn_value_sizes((data,))
        return data

    def get_many(self, keys: Sequence[CacheEngineKey]) -> list[bytes | None]:
        """Concurrent GETs on async filesystems, aligned with ``keys``.

        Each call keeps about ``batch_budget_bytes`` in flight (at least one
        object), sized by the largest object of the latest read (so a pipelined
        batch with ``fetch_parallelism`` calls at once holds that many times it). Small chunks all
        go at once (the win is hiding per-request latency); large ones go a few
        at a time: against a throughput-bound server (moto on loopback) a batch
        of sixteen 32 MiB chunks with all sixteen GETs in flight ran at 0.64x
        sequential ``cat_file``s, with 4-8 in flight (the default 4 fetch groups
        x 2) at 1.4-1.8x (measured with the batch ``cat`` the pooled GETs
        replaced); and a caller batching 16 x 32 MiB would otherwise hold 512 MiB
        of half-read replies. S3 bodies land in pooled buffers
        (``_get_pooled``); other filesystems go through one batch ``cat``.
        """
        if not keys:
            return []
        paths = [self.path(k) for k in keys]
        fs = self.fs
        batch_size = max(1, self.batch_budget_bytes // max(1, self._value_hint))
        if self._pooled:
            from fsspec.asyn import sync

            values: list[Any] = sync(fs.loop, _get_pooled_many, fs, paths, batch_size, self._get_limit)
            error = next((v for v in values if isinstance(v, BaseException) and not _is_miss(v)), None)
            if error is not None:
                # Let go of the batch's pooled buffers now, not when gc breaks the cycle
                # through the traceback; and a CancelledError (a BaseException) would
                # slip past the backend's retry and timeout handling.
                values.clear()
                if isinstance(error, FileNotFoundError):
                    error = self._not_a_miss(error)
                elif not isinstance(error, Exception):
                    error = OSError(f"S3 GET interrupted: {error!r}")
                raise error
            out: list[Any] = [None if isinstance(v, FileNotFoundError) else v for v in values]
            self.learn_value_sizes(out)
            return out
        kwargs = dict(self._cat_kwargs)
        if getattr(fs, "async_impl", False):  # sync filesystems read one path at a time anyway
            kwargs["batch_size"] = batch_size
        found = self._bounded(f"GET of {len(paths)} objects", fs.cat, paths, on_error="return", **kwargs)
        out = []
        for p in paths:
            value = found.get(p)
            if value is None:
                value = found.get(fs._strip_protocol(p))
            if value is None or _is_miss(value):
                out.append(None)
            elif isinstance(value, FileNotFoundError):
                raise self._not_a_miss(value) from value
            elif isinstance(value, OSError) and _is_invalid_range(value):
                out.append(b"")
            elif isinstance(value, BaseException):
                raise value
            else:
                out.append(value if isinstance(value, bytes) else bytes(value))
        self.learn_value_sizes(out)
        return out

    def get_head(self, key: CacheEngineKey, nbytes: int) -> tuple[bytes, int] | None:
        """First ``nbytes`` and the object's size: on S3 one ranged GET (the size is in its
        ``Content-Range``), elsewhere the size, then a ranged read."""
        path = self.path(key)
        fs = self.fs
        try:
            if self._pooled:
                return _run_within(fs, self._get_limit, f"GET of {path}", _get_head, fs, path, nbytes)
            size = int(fs.size(path))
            return (bytes(fs.cat_file(path, start=0, end=min(nbytes, size))) if size else b"", size)
        except FileNotFoundError as exc:
            self._raise_unless_miss(exc)
            return None

    def exists(self, key: CacheEngineKey) -> bool:
        """Whether the object is there; a store that cannot say raises (never "absent")."""
        path = self.path(key)
        fs = self.fs
        try:
            if self.protocol == "s3":
                return self._exists_s3(fs, path)
            # Not fs.isfile(): fsspec's default answers False for *any* error (refused
            # connection, denied, EIO), so an outage read as "absent" and delete()
            # reported nothing to delete.
            info = fs.info(path)
        except FileNotFoundError as exc:
            self._raise_unless_miss(exc)
            return False
        return info.get("type") != "directory"

    def _exists_s3(self, fs: Any, path: str) -> bool:
        # One HEAD; s3fs's exists() follows a 404 with a listing to look for a "directory".
        bucket, obj, _ = fs.split_path(path)
        try:
            fs.call_s3("head_object", Bucket=bucket, Key=obj)
        except FileNotFoundError:
            if time.monotonic() - self._bucket_seen < BUCKET_RECHECK_S:
                return False
        else:
            self._bucket_seen = time.monotonic()  # races between threads are harmless
            return True
        # A HEAD's 404 has no body: it cannot tell a missing object from a missing
        # bucket. A GET's error code can (NoSuchKey, NoSuchBucket), so one follows, at
        # most once per BUCKET_RECHECK_S. HEADs stay the rule: on moto a one-byte GET of
        # a present 32 MiB object took 23 ms, a HEAD 5 ms.
        try:
            _run_within(fs, self._get_limit, f"GET of {path}", _get_head, fs, path, 1)
        except FileNotFoundError as exc:
            if not _is_miss(exc):
                raise
            self._bucket_seen = time.monotonic()
            return False
        return True  # written since the HEAD

    # -- writes --------------------------------------------------------------------

    def put(self, key: CacheEngineKey, parts: Sequence[bytes | memoryview]) -> None:
        if self._local:
            self._put_local(self.path(key), parts)
            return
        body, size = self._body(parts)
        if self.protocol in _RENAME_PUT_PROTOCOLS:
            self._put_renamed(self.path(key), body)
            return
        self._pipe({self.path(key): body}, size)

    def _put_renamed(self, final: str, body: bytes) -> None:
        """Write ``body`` under a temp name beside ``final``, then rename it over ``final``.

        FTP's STOR (and SFTP's writes) fill the file in place, so a reader saw a
        partial chunk, and fail where the directory is missing ("550 No such file or
        directory" for every first put). The directory is made only when the write
        fails, so a put to an existing one costs no extra round trip.
        """
        fs = self.fs
        tmp = layout.temp_path(final)  # never looks like a chunk: listings skip it
        try:
            try:
                fs.pipe_file(tmp, body)
            except Exception:
                parent = final.rsplit("/", 1)[0]
                try:
                    fs.makedirs(parent, exist_ok=True)
                except Exception:
                    if not fs.isdir(parent):  # made by another writer meanwhile: fine
                        raise
                fs.pipe_file(tmp, body)
            fs.mv(tmp, final)
        except BaseException:
            try:
                fs.rm_file(tmp)
            except Exception:  # never written, or the server is gone: nothing to undo here
                pass
            raise

    def put_many(self, items: Sequence[tuple[CacheEngineKey, Sequence[bytes | memoryview]]]) -> None:
        """One batch ``pipe`` (concurrent PUTs on async filesystems)."""
        if self._local or self.protocol in _RENAME_PUT_PROTOCOLS:
            for key, parts in items:
                self.put(key, parts)
            return
        bodies: dict[str, Any] = {}
        largest = 0
        for key, parts in items:
            body, size = self._body(parts)
            bodies[self.path(key)] = body
            largest = max(largest, size)
        if bodies:
            self._pipe(bodies, largest)

    def _pipe(self, bodies: dict[str, Any], largest: int) -> None:
        """PUT ``bodies`` (path -> body); on async filesystems each PUT is given up after
        ``PUT_LIMIT_TIMEOUTS`` store timeouts."""
        fs = self.fs
        kwargs = self._pipe_kwargs(largest)
        if not getattr(fs, "async_impl", False):
            fs.pipe(bodies, **kwargs)
            return
        limit = PUT_LIMIT_TIMEOUTS * self.timeout
        try:
            if len(bodies) == 1:
                ((path, body),) = bodies.items()
                self._check_put_reply(path, fs.pipe_file(path, body, timeout=limit, **kwargs))  # sync: wait_for
            else:
                from fsspec.asyn import sync

                sync(fs.loop, _pipe_bounded, fs, bodies, limit, self._check_put_reply, **kwargs)
        except TimeoutError as exc:
            raise _named_timeout(exc, f"PUT: no answer within {limit:g} s") from exc.__cause__

    def _check_put_reply(self, path: str, reply: Any) -> None:
        """Refuse an S3 PUT "success" with no ETag: every S3 store sends one, and a web
        server or proxy mistaken for the endpoint (a catch-all that answers 200 to
        anything) does not. Its puts were acknowledged and lost, each read of them
        counted a corrupt chunk, and ``contains`` said yes.

        Raises:
            OSError: the reply is not an S3 PUT's (the endpoint is not an S3 store).
        """
        if self.protocol != "s3" or not isinstance(reply, dict) or reply.get("ETag"):
            return
        raise OSError(f"not an S3 endpoint: its PUT reply had no ETag (check endpoint_url; nothing was stored): {path}")

    def _body(self, parts: Sequence[bytes | memoryview]) -> tuple[Any, int]:
        size = sum(memoryview(p).nbytes for p in parts)
        if self.protocol == "s3" and size > _S3_JOIN_BODY_BYTES:
            return PartsReader(parts), size
        return b"".join(parts), size

    def _bounded(self, what: str, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``call(*args, **kwargs)``, a read through one of fsspec's sync wrappers, given up
        after ``GET_LIMIT_TIMEOUTS`` store timeouts on async filesystems (sync ones are
        bounded by their sockets' timeouts)."""
        if not getattr(self.fs, "async_impl", False):
            return call(*args, **kwargs)
        limit = self._get_limit
        try:
            return call(*args, timeout=limit, **kwargs)
        except TimeoutError as exc:
            raise _named_timeout(exc, f"{what}: no answer within {limit:g} s") from exc.__cause__

    def _pipe_kwargs(self, size: int) -> dict[str, Any]:
        if self.protocol == "s3":
            return {"chunksize": max(_S3_DEFAULT_CHUNKSIZE, size)}
        return {}

    def _put_local(self, final: str, parts: Sequence[bytes | memoryview]) -> None:
        # fsspec's mv() is shutil.move, which does not promise an atomic replace;
        # os.replace does (POSIX rename), and the temp name never looks like a chunk.
        tmp = layout.temp_path(final)  # names its writer, so a scan can tell a dead one's leftovers
        try:
            with disk_io.open_write(tmp, make_dir=True) as f:
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view.nbytes:
                        n = f.write(view)
                        view = view[n:]
            os.replace(tmp, final)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            # A full disk or a quota is a full store (an answer: neither retried nor
            # held against the circuit), as the disk tier reports it, not an outage.
            if isinstance(exc, OSError) and exc.errno in disk_io.FULL_ERRNOS:
                raise StoreFullError(self.display_url, f"no space left writing {final} ({exc.strerror})") from exc
            raise

    def delete(self, key: CacheEngineKey) -> bool:
        if not self.exists(key):
            return False
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            return False
        return True

    # -- listing -------------------------------------------------------------------

    def list(self) -> Iterator[RemoteObject]:
        """Every chunk under the prefix; temp files and foreign objects are skipped."""
        return self._list_under(self.root)

    def list_rank(self, fmt: str, model_name: str, world_size: int, worker_id: int) -> Iterator[RemoteObject]:
        """The chunks of one model, fmt and rank: a listing of their directory only
        (on S3 a prefix listing), never of other models' objects."""
        scope = (fmt, model_name, world_size, worker_id)
        under = f"{self.root.rstrip('/')}/{layout.rank_prefix(*scope)}"
        for obj in self._list_under(under):
            k = obj.key
            if (k.fmt, k.model_name, k.world_size, k.worker_id) == scope:
                yield obj

    def _list_under(self, path: str) -> Iterator[RemoteObject]:
        fs = self.fs
        try:
            found = fs.find(path, detail=True)
        except FileNotFoundError as exc:
            self._raise_unless_miss(exc)
            return  # a prefix with nothing under it
        base = fs._strip_protocol(self.root).rstrip("/") + "/"
        for name, info in found.items():
            name = fs._strip_protocol(name)
            if not name.startswith(base) or not layout.is_chunk_name(name.rsplit("/", 1)[-1]):
                continue
            try:
                key = layout.path_to_key(name[len(base) :])
            except ValueError:
                logger.debug("skipping foreign object %s", name)
                continue
            size = info.get("size")
            yield RemoteObject(key, int(size) if size is not None else None, _timestamp(info))

    def close(self) -> None:
        """Forget the client. Idempotent.

        The filesystem instance is shared through fsspec's instance cache with
        any other connector on the same store, so its pooled sockets are not
        closed here; they close with the process.
        """
        self._fs = None
        with self._lock:  # single-session clients are this connector's own: logged out
            sessions, self._sessions = self._sessions, []
        for fs in sessions:
            _log_out(fs)

    def __repr__(self) -> str:
        return f"FsspecConnector({self.display_url!r})"
