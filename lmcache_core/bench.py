"""Benchmark engine: put/get throughput and latency of stores beside the raw medium.

Used by ``lmcache bench`` and the scripts under ``scripts/``. Every operation on
a store is measured in the same run, on the same bytes, beside the medium it
sits on, so the ratio says what the store costs on top of the hardware:

==================  ===========================================================
store kind          raw medium baseline
==================  ===========================================================
memory (``cpu://``) ``copy_`` into warm, pre-allocated memory
disk (a directory)  files laid out as chunk files (header bytes, then the
                    payload): ``write()`` of each into a new file; read the
                    header, then ``readinto`` a warm tensor (hot and cold)
Redis               redis-py ``SET``/``GET`` of the payload bytes
fsspec (``s3://``)  ``pipe_file``/``cat_file`` of the payload bytes
hybrid              the raw medium of its slowest tier
==================  ===========================================================

Operations: ``put`` (blocking), ``put_nonblocking`` (``put(blocking=False)`` for
every chunk, then ``close()``: the time until everything is durable),
``get``, ``batched_get`` (``batch`` keys per call, against the raw medium's
sequential reads of the same objects) and, for disk, ``get_cold`` after the run's
own files are evicted from the page cache (``posix_fadvise(DONTNEED)`` per file;
with ``drop_caches=True`` and root, the whole machine's page cache instead). Raw and store operations are interleaved
chunk by chunk, taking turns at going first, so noise from other processes hits
both sides alike. On remote stores each pair of blocking puts is deleted (untimed)
before the next pair, so a server writes into memory it just freed, as a cache at
capacity does (see the put phase).

GB/s are decimal (1e9 bytes) of tensor payload per second of wall time. Everything
the run writes (chunks under a private model name, raw objects under a private
prefix) is removed at the end, also on failure.

This module never imports the CLI; it is not thread-safe (run one bench at a time).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

import torch

from lmcache_core.chunk_format import checksum, stored_size
from lmcache_core.config import (
    LMCacheEngineConfig,
    LMCacheEngineMetadata,
    check_remote_url,
    mask_secrets_in,
    mask_url,
)
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import open_backend, store_kind
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface

__all__ = [
    "REFERENCE_SHAPE",
    "BenchReport",
    "BenchTarget",
    "chunk_shape_for",
    "drop_page_cache",
    "format_table",
    "machine_info",
    "resident_fraction",
    "run_bench",
    "url_target",
]

#: Llama-3.1-8B, 256 tokens, vLLM layout: 32 MiB in bf16.
REFERENCE_SHAPE: tuple[int, ...] = (32, 2, 256, 8, 128)
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_NB_RAW = 1 << 20  # raw object ids of the non-blocking phase
_NB_ROUNDS = 3  # non-blocking put rounds on local tiers (see _bench_store)
_MIN_BOUND_CPU_S = 0.2  # CPU seconds below which _cpu_bound gives no bound (10 ms ticks)
ROW_KEYS = ("store", "op", "gbps", "p50_ms", "p99_ms", "raw_op", "raw_gbps", "ratio")

Progress = Callable[[str], None]


# -- report ------------------------------------------------------------------------------


@dataclass
class BenchReport:
    """The result of ``run_bench``.

    Attributes:
        rows: one dict per (store, op): ``store, op, gbps, p50_ms, p99_ms, raw_op,
            raw_gbps, ratio`` (ours / raw), plus ``kind, chunk_bytes, samples,
            raw_p50_ms, raw_p99_ms, note``.
        machine: CPU, cores, memory, OS, Python and torch versions.
        params: chunk shape, dtype, bytes, count and batch of the run.
        errors: ``{"store", "error"}`` for stores that could not be benchmarked.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain dicts, lists, numbers and strings)."""
        return {
            "machine": dict(self.machine),
            "params": dict(self.params),
            "rows": [dict(r) for r in self.rows],
            "errors": [dict(e) for e in self.errors],
        }


@dataclass
class BenchTarget:
    """A store to benchmark that a URL alone cannot open (e.g. a hybrid).

    Attributes:
        name: shown in the ``store`` column.
        open: ``open(metadata, capacity_chunks)`` builds a fresh backend for the
            run's metadata (private model name, chunk shape and dtype) with room
            for ``capacity_chunks`` chunks; called once per phase, and each
            instance must see the chunks earlier ones stored durably.
        kind: ``memory``, ``disk``, ``redis``, ``fsspec`` or ``hybrid``.
        raw_url: the URL whose raw medium is the baseline (for a hybrid, its
            slowest tier); defaults to ``name``.
        raw_options: options for the raw client (``endpoint_url`` etc. for S3).
        server_pid: the store's server when it runs on this machine (a benchmark's
            own redis-server or moto): ``batched_get`` then reports the CPU time
            it and this process spent, which bounds what concurrency can win.
    """

    name: str
    open: Callable[[LMCacheEngineMetadata, int], LMCBackendInterface]
    kind: str
    raw_url: str | None = None
    raw_options: Mapping[str, Any] = field(default_factory=dict)
    server_pid: int | None = None

    def __repr__(self) -> str:
        # name and raw_url may hold a password; raw_options S3 keys: never shown.
        raw = mask_url(self.raw_url) if self.raw_url else None
        return f"BenchTarget(name={mask_url(self.name)!r}, kind={self.kind!r}, raw_url={raw!r})"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) * 1024 / 1024**3, 1)
                    break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "root": hasattr(os, "geteuid") and os.geteuid() == 0,
        "redis_parser": _redis_parser(),
    }


def _redis_parser() -> str | None:
    """redis-py's reply parser: "hiredis" (C) or "python"; None without redis-py. The raw
    GET's speed depends on it (the Python one copies each reply into fresh memory)."""
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return None
    return "hiredis" if HIREDIS_AVAILABLE else "python"


def chunk_shape_for(
    chunk_bytes: int | None, kv_shape: Sequence[int] | None, dtype: torch.dtype
) -> tuple[int, ...]:
    """The chunk shape of a run: ``kv_shape``, else the reference shape with as many
    tokens as make ``chunk_bytes`` (flat when that does not divide), else the reference.
    """
    if kv_shape is not None:
        shape = tuple(int(d) for d in kv_shape)
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"kv_shape must be positive dimensions, got {kv_shape!r}")
        return shape
    if chunk_bytes is None:
        return REFERENCE_SHAPE
    if chunk_bytes <= 0 or chunk_bytes % dtype.itemsize:
        raise ValueError(f"chunk_bytes must be a positive multiple of {dtype.itemsize}, got {chunk_bytes}")
    layers, kv, _, heads, head = REFERENCE_SHAPE
    per_token = layers * kv * heads * head * dtype.itemsize
    if chunk_bytes % per_token == 0:
        return (layers, kv, chunk_bytes // per_token, heads, head)
    return (chunk_bytes // dtype.itemsize,)


# -- measurement helpers -----------------------------------------------------------------


class _Series:
    """Per-operation wall times (ns) and the payload bytes they moved."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self.nbytes = 0
        self.total_ns: int | None = None  # set for phases timed as a whole

    @contextlib.contextmanager
    def op(self, nbytes: int) -> Iterator[None]:
        t0 = time.perf_counter_ns()
        yield
        self.times.append(time.perf_counter_ns() - t0)
        self.nbytes += nbytes

    def gbps(self) -> float | None:
        total = self.total_ns if self.total_ns is not None else sum(self.times)
        return _sig(self.nbytes / total) if total > 0 and self.nbytes else None

    def pct_ms(self, q: float) -> float | None:
        if not self.times:
            return None
        ts = sorted(self.times)
        # linear interpolation between closest ranks (numpy's default)
        pos = (len(ts) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        v = ts[lo] + (ts[hi] - ts[lo]) * (pos - lo)
        return _sig(v / 1e6)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _CpuTally:
    """CPU seconds this process and a server spent inside its ``with`` blocks (summed).

    Read around the timed block, so the reads cost the timing nothing; /proc counts
    in clock ticks (10 ms), which is why only whole batches are tallied.
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.client_s = 0.0
        self.server_s: float | None = 0.0 if server_pid is not None else None
        self._start: tuple[float, float | None] = (0.0, None)

    def __enter__(self) -> None:
        pid = self.server_pid
        self._start = (time.process_time(), process_cpu_s(pid) if pid is not None else None)

    def __exit__(self, *exc: object) -> None:
        client0, server0 = self._start
        self.client_s += time.process_time() - client0
        if self.server_s is not None:
            server1 = process_cpu_s(self.server_pid) if self.server_pid is not None else None
            self.server_s = None if server0 is None or server1 is None else self.server_s + server1 - server0


def _cpu_bound(raw: _Series, raw_cpu: _CpuTally, ours: _Series, ours_cpu: _CpuTally) -> dict[str, Any]:
    """CPU spent by both sides of a ``batched_get`` comparison, and the ratio it allows.

    However requests are overlapped, a batch cannot finish before the machine's
    cores have done its CPU work: ``floor = (client + server CPU) / cores``. The
    best ratio over the sequential reads is then ``sequential wall / floor``;
    also given for the sequential reads' own CPU spread over every core (what a
    batch that added no CPU of its own could reach).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    raw_wall = sum(raw.times) / 1e9
    wall = sum(ours.times) / 1e9
    cpu = ours_cpu.client_s + (ours_cpu.server_s or 0.0)
    seq_cpu = raw_cpu.client_s + (raw_cpu.server_s or 0.0)
    # /proc counts 10 ms ticks: below ~20 of them a bound would mostly be rounding.
    best = raw_wall / (cpu / cores) if cpu >= _MIN_BOUND_CPU_S else None
    # The same bound for a batch that spent no more CPU than the sequential reads did.
    best_seq = raw_wall / (seq_cpu / cores) if seq_cpu >= _MIN_BOUND_CPU_S else None
    out: dict[str, Any] = {
        "cores": cores,
        "raw_wall_s": _sig(raw_wall, 3),
        "raw_client_cpu_s": _sig(raw_cpu.client_s, 3),
        "raw_server_cpu_s": _sig(raw_cpu.server_s or 0.0, 3),
        "wall_s": _sig(wall, 3),
        "client_cpu_s": _sig(ours_cpu.client_s, 3),
        "server_cpu_s": _sig(ours_cpu.server_s or 0.0, 3),
        "best_ratio": _sig(best, 3) if best else None,
        "best_ratio_at_sequential_cpu": _sig(best_seq, 3) if best_seq else None,
    }
    bound = (
        f"on {cores} cores this batch could not beat {out['best_ratio']}x, "
        f"nor one spending only the sequential reads' CPU {out['best_ratio_at_sequential_cpu']}x"
        if best and best_seq
        else f"too little CPU time (under {_MIN_BOUND_CPU_S} s) to bound the ratio"
    )
    out["summary"] = (
        f"CPU s client+server: sequential {out['raw_client_cpu_s']}+{out['raw_server_cpu_s']} "
        f"in {out['raw_wall_s']} s, batched {out['client_cpu_s']}+{out['server_cpu_s']} in {out['wall_s']} s; "
        + bound
    )
    return out


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny test chunks must not round to 0)."""
    return float(f"{x:.{digits}g}")


def _row(
    store: str,
    kind: str,
    op: str,
    ours: _Series,
    raw_op: str,
    raw: _Series | None,
    chunk_bytes: int,
    note: str = "",
) -> dict[str, Any]:
    g = ours.gbps()
    rg = raw.gbps() if raw is not None else None
    return {
        "store": store,
        "op": op,
        "gbps": g,
        "p50_ms": ours.pct_ms(0.5),
        "p99_ms": ours.pct_ms(0.99),
        "raw_op": raw_op,
        "raw_gbps": rg,
        "ratio": _sig(g / rg, 3) if g and rg else None,
        "kind": kind,
        "chunk_bytes": chunk_bytes,
        "samples": len(ours.times),
        "raw_p50_ms": raw.pct_ms(0.5) if raw is not None else None,
        "raw_p99_ms": raw.pct_ms(0.99) if raw is not None else None,
        "note": note,
    }


_WRITE_FAILURE_COUNTERS = ("background_put_failures", "put_failures", "dropped_on_close")


def _write_failures(store: LMCBackendInterface) -> int:
    """Writes the store failed or dropped, its tiers' and remote's included (a hybrid
    counts only its own: a remote that stored none of its queued writes read as 0)."""
    parts: list[Any] = [store]
    tiers = getattr(store, "tiers", None)
    if callable(tiers):
        parts += [tier for _, tier in tiers()]
    remote = getattr(store, "remote", None)
    if remote is not None and all(remote is not p for p in parts):
        parts.append(remote)
    return sum(int(p.stats[c]) for p in parts for c in _WRITE_FAILURE_COUNTERS)


def _serves_views(store: LMCBackendInterface, key: CacheEngineKey) -> bool:
    """Whether two gets of ``key`` return the same memory: a view of the cache, not a copy."""
    a, b = store.get(key), store.get(key)
    return a is not None and b is not None and a.numel() > 0 and a.data_ptr() == b.data_ptr()


def _payload(t: torch.Tensor) -> memoryview:
    array: Any = t.reshape(-1).view(torch.uint8).numpy()  # a buffer; numpy's stubs do not say so
    return memoryview(array).cast("B")


# -- raw media ---------------------------------------------------------------------------


class _RawMedium:
    """The bare medium under a store: same bytes, no format, no index."""

    put_op = "put"
    get_op = "get"

    def prepare(self, chunk: torch.Tensor) -> Any:
        """What ``put`` takes, made outside the timed region (e.g. ``bytes`` for a client
        that accepts nothing else: the conversion is not the medium's cost)."""
        return chunk

    def put(self, i: int, chunk: Any) -> None:
        raise NotImplementedError

    def get(self, i: int) -> None:
        raise NotImplementedError

    def delete(self, i: int) -> None:
        """Remove object ``i`` (remote media; see the blocking put phase)."""
        raise NotImplementedError

    def cleanup(self) -> None:  # noqa: B027 - optional
        """Remove everything written."""


class _RawMemory(_RawMedium):
    put_op = "copy_ (warm)"
    get_op = "copy_ (warm)"

    def __init__(self, n: int, chunk_bytes: int) -> None:
        # Touched now, so copies hit warm pages like a pre-allocated pool's.
        self._slots = [torch.zeros(chunk_bytes, dtype=torch.uint8) for _ in range(n)]
        self._out = torch.zeros(chunk_bytes, dtype=torch.uint8)

    def put(self, i: int, chunk: torch.Tensor) -> None:
        self._slots[i % len(self._slots)].copy_(chunk.reshape(-1).view(torch.uint8))

    def get(self, i: int) -> None:
        self._out.copy_(self._slots[i % len(self._slots)])

    def cleanup(self) -> None:
        self._slots.clear()


class _RawFile(_RawMedium):
    """Files laid out as chunk files are: ``header_bytes`` (opaque here), then the payload.

    The same bytes in the same places as the store's, written and read the way any
    reader of a headed format does (header, then payload into a warm buffer). A file
    of the payload alone is not the same work: on ext4 here a 2 MiB write() at
    offset 0 of a new file took 7.8 ms and the same write after a 312-byte header
    0.9 ms, and a cold whole-file readinto ran 40 % slower than header + payload reads.
    """

    put_op = "write() header + payload"
    get_op = "readinto (warm buffer)"

    def __init__(self, directory: str, chunk_bytes: int, header_bytes: int) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self._header = os.urandom(header_bytes)
        self._header_in = bytearray(header_bytes)
        self._buf = torch.zeros(chunk_bytes, dtype=torch.uint8)
        self._view = _payload(self._buf)

    def _path(self, i: int) -> str:
        return os.path.join(self.dir, f"{i}.bin")

    def put(self, i: int, chunk: torch.Tensor) -> None:
        view = _payload(chunk)
        with open(self._path(i), "wb", buffering=0) as f:
            f.write(self._header)  # under 4 KiB: written whole
            while view:
                view = view[f.write(view) :]

    def get(self, i: int) -> None:
        with open(self._path(i), "rb", buffering=0) as f:
            f.readinto(self._header_in)
            done, n = 0, len(self._view)
            while done < n:
                got = f.readinto(self._view[done:])
                if not got:
                    break
                done += got

    def get_and_hash(self, i: int) -> None:
        """``get``, then the checksum a store verifies over the same bytes (the floor of a
        verified read on one thread, before any open, header or index work)."""
        self.get(i)
        checksum(self._view)

    def paths(self, ids: Sequence[int]) -> list[str]:
        return [self._path(i) for i in ids]

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _RawRedis(_RawMedium):
    put_op = "redis-py SET"
    get_op = "redis-py GET"

    def __init__(self, url: str, token: str, timeout: float) -> None:
        import redis

        from lmcache_core.storage_backend.connector.redis_connector import split_query

        # Only our own query options (prefix, staged_puts) mean nothing to redis-py; the
        # rest (password, db, ssl_*, ...) reach it as they reach the store's client.
        # String surgery, not urlunsplit: that turned unix:///path into unix:/path.
        clean = url
        for name in ("prefix", "staged_puts"):
            clean = split_query(clean, name)[0]
        scheme = urlsplit(clean).scheme.lower()
        clean = clean.replace("+cluster://", "://", 1)
        # The store's timeouts, so a server that stopped answering fails this client
        # in bounded time too (redis-py before 8 waits forever); the URL's own win.
        bounds = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        try:
            if "cluster" in scheme:
                from redis.cluster import RedisCluster

                self.client: Any = RedisCluster.from_url(clean, **bounds)
            else:
                self.client = redis.Redis.from_url(clean, **bounds)
        except ValueError:
            # redis-py quotes parts of the URL, and in a mistyped one (a '/' in the
            # password) those parts are the password: "... integer value as 'pa'".
            raise ValueError(
                f"not a valid Redis URL: {mask_url(url)}: expected redis://[user:pw@]host:port/db"
            ) from None
        self.prefix = f"lmcache-bench-raw:{token}:"
        self._written: set[int] = set()

    def put(self, i: int, chunk: torch.Tensor) -> None:
        # Recorded first: a SET interrupted after the server stored it (Ctrl-C, a
        # timeout on the reply) must still be deleted at the end.
        self._written.add(i)
        self.client.set(f"{self.prefix}{i}", _payload(chunk))

    def get(self, i: int) -> None:
        self.client.get(f"{self.prefix}{i}")

    def delete(self, i: int) -> None:
        self.client.delete(f"{self.prefix}{i}")
        self._written.discard(i)

    def cleanup(self) -> None:
        names = [f"{self.prefix}{i}" for i in sorted(self._written)]
        with contextlib.suppress(Exception):
            # A few DELs of many keys, not one round trip per key: on a remote server
            # (tens of ms away) a key at a time took seconds, and Ctrl-C leaves little.
            for start in range(0, len(names), 512):
                self.client.delete(*names[start : start + 512])
            self._written.clear()
        with contextlib.suppress(Exception):
            self.client.close()


class _RawFsspec(_RawMedium):
    def __init__(self, url: str, token: str, options: Mapping[str, Any], timeout: float) -> None:
        import fsspec

        parts = urlsplit(url)
        self.put_op = f"{parts.scheme} pipe_file"
        self.get_op = f"{parts.scheme} cat_file"
        merged: dict[str, Any] = dict(parse_qsl(parts.query))  # ?endpoint_url=... as the store takes it
        merged.update(options)
        fs_opts = {k: v for k, v in merged.items() if k in _FSSPEC_OPTIONS}
        if "region" in merged:
            fs_opts["client_kwargs"] = {"region_name": merged["region"], **fs_opts.get("client_kwargs", {})}
        self._call_kwargs: dict[str, Any] = {}
        if parts.scheme in ("s3", "s3a"):
            # The store's timeouts, so an endpoint that stopped answering fails this
            # client in bounded time too: with botocore's defaults (60 s connect and
            # read, retried) and s3fs's own retries, a blackholed endpoint held
            # `lmcache bench` for minutes. They cost a call that succeeds nothing.
            config = dict(fs_opts.get("config_kwargs") or {})
            config.setdefault("connect_timeout", timeout)
            config.setdefault("read_timeout", timeout)
            config.setdefault("retries", {"total_max_attempts": 1})
            fs_opts["config_kwargs"] = config
            # A PUT waiting for "100 Continue" has no socket timer at all (see the
            # fsspec connector): fsspec's own limit on the call bounds it.
            self._call_kwargs["timeout"] = 2 * timeout
        self.fs = fsspec.filesystem(parts.scheme, skip_instance_cache=True, **fs_opts)
        if self._call_kwargs:
            self.fs.retries = 1  # s3fs retries with sleeps of its own
        base = (parts.netloc + parts.path).rstrip("/")
        self.dir = f"{base}/.lmcache-bench-raw-{token}"
        self._written: set[int] = set()

    def _path(self, i: int) -> str:
        return f"{self.dir}/{i}.bin"

    def prepare(self, chunk: torch.Tensor) -> Any:
        # botocore's put_object takes bytes, bytearray or a file, not a memoryview.
        return bytes(_payload(chunk))

    def put(self, i: int, chunk: Any) -> None:
        self._written.add(i)  # first: a PUT interrupted after the server stored it
        with self._bounded(self.put_op):
            self.fs.pipe_file(self._path(i), chunk, **self._call_kwargs)

    def get(self, i: int) -> None:
        with self._bounded(self.get_op):
            self.fs.cat_file(self._path(i), **self._call_kwargs)

    @contextlib.contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        """fsspec's limit says only "FSTimeoutError:"; the report should say what waited."""
        from fsspec.exceptions import FSTimeoutError

        try:
            yield
        except FSTimeoutError:
            raise TimeoutError(f"raw {what}: no answer within {self._call_kwargs['timeout']:g} s") from None

    def delete(self, i: int) -> None:
        self.fs.rm_file(self._path(i))
        self._written.discard(i)

    def cleanup(self) -> None:
        # Everything under the run's private directory, also what was stored by a
        # write whose reply never came; then, where listing failed, what was tracked.
        if not self._written:
            return
        try:
            # One listing and one batch delete; bounded once like a call (async
            # filesystems take the limit), so a dead endpoint costs one timeout here.
            limit = {"timeout": self._call_kwargs["timeout"] / 2} if self._call_kwargs else {}
            self.fs.rm(self.dir, recursive=True, **limit)
        except FileNotFoundError:
            pass
        except TimeoutError:
            pass  # the endpoint stopped answering: each delete would wait as long again
        except Exception:  # e.g. listing refused: delete what was tracked, one by one
            for i in sorted(self._written):
                try:
                    self.fs.rm_file(self._path(i))
                except FileNotFoundError:
                    continue
                except Exception:
                    break  # refused or unanswered: the next ones would fare no better


_FSSPEC_OPTIONS = frozenset(
    {
        "endpoint_url",
        "key",
        "secret",
        "token",
        "anon",
        "client_kwargs",
        "config_kwargs",
        "use_ssl",
        "region_name",
    }
)


def _raw_for(
    kind: str, url: str, token: str, chunk_bytes: int, n: int, options: Mapping[str, Any], header_bytes: int
) -> _RawMedium:
    # The raw clients get the store's timeout (``remote_timeout``, as ``url_target``'s
    # store is opened with it): a dead server must end both sides' calls alike.
    timeout = float(options.get("remote_timeout") or LMCacheEngineConfig().remote_timeout)
    if kind == "memory":
        return _RawMemory(n, chunk_bytes)
    if kind == "disk":
        root = url[len("file://") :] if url.startswith("file://") else url
        root = os.path.abspath(os.path.expanduser(root))
        # Same filesystem as the store, so both sides write through the same page cache.
        return _RawFile(os.path.join(root, f".lmcache-bench-raw-{token}"), chunk_bytes, header_bytes)
    if kind == "redis":
        return _RawRedis(url, token, timeout)
    # The raw client is built before the store, from the same URL: it must refuse what
    # the store refuses (``s3://key:secret@bucket``) instead of sending it as a bucket.
    check_remote_url(url)
    return _RawFsspec(url, token, options, timeout)


def _kind_of(url: str) -> str:
    kind = store_kind(url)
    if kind != "remote":
        return kind
    return "redis" if urlsplit(url).scheme.lower() in _REDIS_SCHEMES else "fsspec"


# -- page cache --------------------------------------------------------------------------


def drop_page_cache(paths: Sequence[str], *, whole_machine: bool = False) -> str:
    """Evict ``paths`` from the page cache; returns the method used.

    ``fdatasync`` then ``posix_fadvise(DONTNEED)`` per file (dirty pages cannot be
    dropped, hence the sync first). With ``whole_machine`` and root: ``sync`` then
    ``/proc/sys/vm/drop_caches``, which also throws out every other process's
    cached files (a serving engine's hot disk-tier chunks among them), so only a
    dedicated benchmark machine should ask for it.
    """
    if whole_machine and hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "drop_caches"
        except OSError:
            pass
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "posix_fadvise"


#: Share of the files' pages still cached after a drop above which reads are not cold.
_COLD_RESIDENT_MAX = 0.1


def resident_fraction(paths: Sequence[str]) -> float | None:
    """Share of the pages of ``paths`` in the page cache (``mincore``), None where unknown.

    The files are mapped, never read, so asking faults nothing in.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
        ]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = cached = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            if not size:
                continue
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                total += pages
                cached += sum(b & 1 for b in vec)
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return cached / total if total else None


# -- the run -----------------------------------------------------------------------------


def run_bench(
    stores: Sequence[str | BenchTarget],
    *,
    chunk_bytes: int | None = None,
    kv_shape: tuple[int, ...] | None = None,
    dtype: str = "bfloat16",
    count: int = 8,
    batch: int = 16,
    progress: Progress | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    drop_caches: bool = False,
    torch_threads: int | None = 1,
) -> BenchReport:
    """Benchmark each store beside its raw medium.

    Args:
        stores: store URLs (as for ``open_backend``: ``cpu://``, a directory,
            ``redis://...``, ``s3://...``) or ``BenchTarget`` objects.
        chunk_bytes: chunk size; the shape is the reference layout with as many
            tokens as fit (ignored when ``kv_shape`` is given).
        kv_shape: exact chunk shape (default: ``REFERENCE_SHAPE``, 32 MiB in bf16).
        dtype: torch dtype name of the chunks.
        count: chunks per timed operation (at least 2).
        batch: keys per ``batched_get`` call; the store holds ``max(count, batch)`` chunks.
        progress: called with a short message before each phase.
        options: per store URL, extra ``open_backend`` options (also given to the
            raw fsspec client: ``endpoint_url``, ``key``, ``secret``, ...).
        drop_caches: for cold disk reads, drop the whole machine's page cache when
            root (``drop_page_cache``); default: evict only this run's files.
        torch_threads: torch's intra-op threads during the run (restored after; None:
            leave them). Both sides' ``copy_`` run on them: with 2 on a 2-core VM whose
            other core was busy (a server, another job), a 4 MiB ``copy_`` stalled at
            0.5 GB/s where one thread ran at 25-40 GB/s, and single runs' memory put
            ratios ranged 0.75-15.

    Returns:
        A ``BenchReport``; stores that failed are in ``report.errors``.

    Raises:
        ValueError: bad shape, dtype, count or batch.
    """
    shape, tdtype, nbytes = check_params(chunk_bytes, kv_shape, dtype, count, batch)
    say = progress or (lambda _msg: None)
    threads_before = torch.get_num_threads()
    report = BenchReport(
        machine=machine_info(),
        params={
            "kv_shape": list(shape),
            "dtype": dtype,
            "chunk_bytes": nbytes,
            "count": count,
            "batch": batch,
            "torch_threads": torch_threads or threads_before,
        },
    )
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        _run_targets(report, stores, shape, tdtype, nbytes, count, batch, say, options, drop_caches)
    finally:
        torch.set_num_threads(threads_before)
    return report


def _run_targets(
    report: BenchReport,
    stores: Sequence[str | BenchTarget],
    shape: tuple[int, ...],
    tdtype: torch.dtype,
    nbytes: int,
    count: int,
    batch: int,
    say: Progress,
    options: Mapping[str, Mapping[str, Any]] | None,
    drop_caches: bool,
) -> None:
    n = max(count, batch)
    say(f"generating {n + 1} chunks of {nbytes / 2**20:.1f} MiB" if nbytes >= 1 << 20 else f"generating {n + 1} chunks of {nbytes} bytes")
    gen = torch.Generator().manual_seed(0)
    # Random payloads: nothing in the path may profit from compressible or equal data.
    chunks = [torch.randn(shape, generator=gen, dtype=torch.float32).to(tdtype) for _ in range(n + 1)]
    for target in stores:
        name = target.name if isinstance(target, BenchTarget) else target
        try:  # one broken store (a bad URL too) must not lose the others' figures
            tgt = (
                target
                if isinstance(target, BenchTarget)
                else url_target(target, options=(options or {}).get(target, {}))
            )
            name = tgt.name
            report.rows.extend(_bench_store(tgt, chunks, shape, tdtype, nbytes, count, batch, say, drop_caches))
        except Exception as exc:
            report.errors.append({"store": mask_secrets_in(name), "error": _error_text(exc)})


def check_params(
    chunk_bytes: int | None, kv_shape: Sequence[int] | None, dtype: str, count: int, batch: int
) -> tuple[tuple[int, ...], torch.dtype, int]:
    """``run_bench``'s parameters checked before any work: (shape, torch dtype, chunk bytes).

    Raises:
        ValueError: a dtype chunks cannot be stored in, a bad shape or size, count < 2, batch < 1.
    """
    from lmcache_core.chunk_format import dtype_name, storable_dtypes

    tdtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    try:
        if not isinstance(tdtype, torch.dtype):
            raise ValueError
        dtype_name(tdtype)
    except ValueError:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(storable_dtypes())}") from None
    if count < 2 or batch < 1:
        raise ValueError(f"count must be >= 2 and batch >= 1, got count={count} batch={batch}")
    shape = chunk_shape_for(chunk_bytes, kv_shape, tdtype)
    return shape, tdtype, math.prod(shape) * tdtype.itemsize


def _error_text(exc: BaseException) -> str:
    """``Type: message`` on one line, credentials masked: what a report may hold.

    Exception texts quote what they were given, and a client library quotes it in
    its own form: botocore names the bucket ``AKIA:secret@bucket``, without the
    ``s3://`` a URL-only mask looks for (``mask_secrets_in`` masks both forms).
    """
    text = " ".join(part.strip() for part in f"{type(exc).__name__}: {exc}".splitlines() if part.strip())
    return mask_secrets_in(text)


def url_target(
    url: str,
    *,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    server_pid: int | None = None,
) -> BenchTarget:
    """A ``BenchTarget`` for a store URL (what ``run_bench`` builds for plain URLs).

    Args:
        url: as for ``open_backend``.
        name: the ``store`` column (default: the URL, secrets masked).
        options: ``open_backend`` options, also given to the raw fsspec client.
        server_pid: the store's server process on this machine, if any (``BenchTarget``).
    """
    kind = _kind_of(url)
    opts = dict(options or {})

    def opener(meta: LMCacheEngineMetadata, n: int) -> LMCBackendInterface:
        extra: dict[str, Any] = dict(opts)
        if kind == "memory":
            # Room for every chunk of the run plus slack, pre-allocated as the slot pool.
            nbytes = math.prod(meta.kv_shape or ()) * meta.kv_dtype.itemsize
            extra.setdefault("max_local_cache_size", n * nbytes / 1024**3)
        elif kind == "disk":
            # Never evict the user's chunks to make room for ours.
            extra.setdefault("max_local_disk_size", float(1 << 20))
        return open_backend(url, dst_device="cpu", metadata=meta, **extra)

    return BenchTarget(
        name=name or url, open=opener, kind=kind, raw_url=url, raw_options=opts, server_pid=server_pid
    )


def _bench_store(
    tgt: BenchTarget,
    chunks: list[torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    nbytes: int,
    count: int,
    batch: int,
    say: Progress,
    drop_caches: bool = False,
) -> list[dict[str, Any]]:
    token = secrets.token_hex(4)
    model = f"lmcache-bench-{token}"
    meta = LMCacheEngineMetadata(model_name=model, kv_dtype=dtype, kv_shape=shape)
    n = len(chunks) - 1
    kind = tgt.kind
    name = mask_secrets_in(tgt.name)  # mask_url would turn ``cpu://`` into ``cpu:``

    def key(i: int, phase: int) -> CacheEngineKey:
        # ``phase`` (one hex digit) keeps each phase's keys apart.
        return CacheEngineKey("vllm", model, 1, 0, f"{phase:x}{i:063x}")

    def open_store() -> LMCBackendInterface:
        return tgt.open(meta, n + 2)

    raw_kind = _kind_of(tgt.raw_url or tgt.name) if kind == "hybrid" else kind
    header_bytes = stored_size(chunks[0], key(0, 0xA).to_string()) - nbytes
    # A store directory the run creates (and its new parents) goes again at the end.
    made_dirs = _missing_dirs(tgt.raw_url or tgt.name) if raw_kind == "disk" else []
    try:
        raw = _raw_for(raw_kind, tgt.raw_url or tgt.name, token, nbytes, n + 1, tgt.raw_options, header_bytes)
    except BaseException:
        _remove_empty_dirs(made_dirs)
        raise
    written: list[CacheEngineKey] = []
    rows: list[dict[str, Any]] = []
    store: LMCBackendInterface | None = None
    try:
        # 1. non-blocking put until durable, on its own instance: close() is the drain.
        # Local tiers run it in rounds: on these VMs a write into fresh pages costs up
        # to 10x one into pages just freed, and which regime a phase meets changes
        # within seconds (single-round ratios ranged 0.35-3.7x), so the sides take
        # turns and the row sums every round.
        rounds = _NB_ROUNDS if kind in ("memory", "disk") else 1
        say(f"{name}: put_nonblocking x{n}" + (f", {rounds} rounds" if rounds > 1 else ""))
        raw_nb, ours_nb = _Series(), _Series()
        ours_nb.total_ns = 0
        per_round: list[float] = []
        failed = 0
        all_nb_keys: list[CacheEngineKey] = []

        def raw_sequential(first: int) -> int:
            t0 = time.perf_counter_ns()
            for i in range(n):
                data = raw.prepare(chunks[i])
                with raw_nb.op(nbytes):
                    raw.put(first + i, data)  # new objects, as ours are
                del data
            return time.perf_counter_ns() - t0

        for r in range(rounds):
            # The raw writer runs before and after ours: which side writes first gets
            # the pages the previous phase just freed (much faster on these VMs).
            raw_ns = raw_sequential(_NB_RAW + 2 * r * n)
            nb_keys = [key(r * n + i, 0xB) for i in range(n)]
            nb_store = open_store()
            try:
                # Recorded before they are written: a write interrupted (Ctrl-C, an
                # error) after it landed must still be removed at the end.
                written.append(key(n + r, 0xC))
                written.extend(nb_keys)
                _warm(nb_store, key(n + r, 0xC), chunks[n])
                t0 = time.perf_counter_ns()
                for i in range(n):
                    with ours_nb.op(nbytes):
                        nb_store.put(nb_keys[i], chunks[i], blocking=False)
            finally:
                nb_store.close()
            ours_ns = time.perf_counter_ns() - t0
            ours_nb.total_ns += ours_ns
            failed += _write_failures(nb_store)
            all_nb_keys.extend(nb_keys)
            del nb_store  # a memory tier's slots go back before the next instance allocates its own
            raw_ns += raw_sequential(_NB_RAW + (2 * r + 1) * n)
            per_round.append(raw_ns / (2 * ours_ns) if ours_ns else 0.0)
        rows.append(
            _row(
                name,
                kind,
                "put_nonblocking",
                ours_nb,
                raw.put_op + " (sequential)",
                raw_nb,
                nbytes,
                "GB/s until close() returned (disk: in the page cache, fsync off as by default); "
                "p50/p99 are the submit latency"
                + (f"; ratio per round {', '.join(f'{x:.2f}' for x in per_round)}" if rounds > 1 else "")
                + (f"; {failed} background writes failed" if failed else ""),
            )
        )

        store = open_store()
        # Untimed: every acknowledged write is in the store once close() returned (a
        # memory tier's chunks end with their instance).
        if kind != "memory":
            # A hybrid answers contains() from its local tiers: ask the remote itself.
            where: LMCBackendInterface = getattr(store, "remote", None) or store
            lost = sum(not where.contains(k) for k in all_nb_keys)
            if lost:
                rows[-1]["note"] += f"; {lost} acknowledged writes not found after close()"
        # 2. blocking put, interleaved with the raw medium chunk by chunk.
        say(f"{name}: put x{n}")
        written.append(key(n, 0xD))  # before the write, as above
        _warm(store, key(n, 0xD), chunks[n])
        keys = [key(i, 0xA) for i in range(n)]
        raw_put, ours_put = _Series(), _Series()
        # A remote server gets each pair's objects deleted (untimed) before the next pair,
        # so both sides write into memory the server just freed, as a cache at capacity
        # does. Filling fresh memory instead, single 32 MiB SETs on these VMs took 20 to
        # 300 ms at random (the server's page faults), which decided the ratio more
        # than either client did (0.72-1.05 run to run).
        recycle = kind in ("redis", "fsspec")
        for i in range(n):
            written.append(keys[i])
            for side in _turns(i):
                if side == "raw":
                    data = raw.prepare(chunks[i])
                    with raw_put.op(nbytes):
                        raw.put(i, data)
                    del data
                else:
                    with ours_put.op(nbytes):
                        store.put(keys[i], chunks[i])
            if recycle:
                raw.delete(i)
                store.remove(keys[i])
        if recycle:  # what the reads below need, written untimed
            for i in range(n):
                data = raw.prepare(chunks[i])
                raw.put(i, data)
                del data
                store.put(keys[i], chunks[i])
        rows.append(
            _row(
                name, kind, "put", ours_put, raw.put_op, raw_put, nbytes,
                "each pair deleted (untimed) before the next pair" if recycle else "",
            )
        )  # fmt: skip

        # 3. get, hot.
        say(f"{name}: get x{count}")
        raw_get, ours_get = _Series(), _Series()
        misses = _read_pairs(raw, store, keys[:count], nbytes, raw_get, ours_get)
        note = f"{misses} misses" if misses else ""
        if _serves_views(store, keys[0]):  # the memory tier, and a hybrid's hits in it
            note = "zero-copy (returns a view of the cache)" + (f"; {note}" if note else "")
        rows.append(_row(name, kind, "get", ours_get, raw.get_op, raw_get, nbytes, note))
        if kind == "disk" and isinstance(raw, _RawFile):
            rows[-1].update(_checksum_ceiling(raw, count, nbytes))

        # 4. batched_get against sequential raw reads of the same objects.
        rounds = max(2, count // batch)
        say(f"{name}: batched_get {batch} x{rounds}")
        raw_b, ours_b = _Series(), _Series()
        raw_cpu, ours_cpu = _CpuTally(tgt.server_pid), _CpuTally(tgt.server_pid)
        bkeys = keys[:batch]
        del store.batched_get(bkeys)[:]  # untimed: a serving process has its read buffers warm
        for r in range(rounds):
            for side in _turns(r):
                if side == "raw":
                    with raw_cpu, raw_b.op(nbytes * batch):
                        for i in range(batch):
                            raw.get(i)
                else:
                    with ours_cpu, ours_b.op(nbytes * batch):
                        got_all = store.batched_get(bkeys)
                    misses = sum(g is None for g in got_all)
                    del got_all
        row = _row(
            name,
            kind,
            f"batched_get[{batch}]",
            ours_b,
            raw.get_op + f" x{batch} sequential",
            raw_b,
            nbytes,
            "p50/p99 per batch" + (f"; {misses} misses" if misses else ""),
        )
        # The same batch against this store's own gets one after another (the get row):
        # what batching gains, apart from any per-get lead over the raw client.
        own, batched = ours_get.gbps(), ours_b.gbps()
        row["own_sequential_ratio"] = _sig(batched / own, 3) if own and batched else None
        if row["own_sequential_ratio"] is not None:
            row["note"] += f"; {row['own_sequential_ratio']}x this store's sequential gets"
        if tgt.server_pid is not None and raw_cpu.server_s is not None and ours_cpu.server_s is not None:
            row["cpu"] = _cpu_bound(raw_b, raw_cpu, ours_b, ours_cpu)
            row["note"] += "; " + row["cpu"]["summary"]
        rows.append(row)

        # 5. cold reads (disk): page cache dropped, then raw and ours interleaved.
        if kind == "disk" and isinstance(raw, _RawFile):
            say(f"{name}: get_cold x{count}")
            ours_paths = [store._path(k) for k in keys[:count]] if hasattr(store, "_path") else []
            cold_paths = raw.paths(range(count)) + ours_paths
            method = drop_page_cache(cold_paths, whole_machine=drop_caches)
            # Measured, not assumed: tmpfs (and ramfs) keep every page whatever is dropped,
            # and there these "cold" reads were hot ones, 100 % of the pages in memory.
            resident = resident_fraction(cold_paths)
            cold = resident is None or resident <= _COLD_RESIDENT_MAX
            raw_c, ours_c = _Series(), _Series()
            misses = _read_pairs(raw, store, keys[:count], nbytes, raw_c, ours_c)
            pct = None if resident is None else round(100 * resident, 1)
            note = (
                f"page cache dropped via {method}"
                if cold
                else f"NOT cold: {pct:g}% of the files' pages stayed in the page cache after {method} "
                "(tmpfs and ramfs keep files in memory)"
            )
            rows.append(
                _row(
                    name,
                    kind,
                    "get_cold",
                    ours_c,
                    raw.get_op.replace("warm buffer", "warm buffer, cold file" if cold else f"{pct}% cached"),
                    raw_c,
                    nbytes,
                    note + (f"; {misses} misses" if misses else ""),
                )
            )
            rows[-1].update({"cold": cold, "resident_pct": pct})
    finally:
        say(f"{name}: cleaning up")
        _cleanup(
            store,
            open_store if store is None else None,
            written,
            raw,
            raw_kind,
            tgt.raw_url or tgt.name,
            model,
            made_dirs,
        )
    return rows


def _read_pairs(
    raw: _RawMedium,
    store: LMCBackendInterface,
    keys: Sequence[CacheEngineKey],
    nbytes: int,
    raw_series: _Series,
    ours_series: _Series,
) -> int:
    """Read object ``i`` from the raw medium and ``keys[i]`` from the store, pair by pair,
    taking turns at going first; returns the store's misses."""
    misses = 0
    for i, key in enumerate(keys):
        for side in _turns(i):
            if side == "raw":
                with raw_series.op(nbytes):
                    raw.get(i)
            else:
                with ours_series.op(nbytes):
                    got = store.get(key)
                misses += got is None
                del got  # hand pool buffers back before the next read
    return misses


def _checksum_ceiling(raw: _RawFile, count: int, nbytes: int) -> dict[str, Any]:
    """What a hot read costs once it is verified: raw ``readinto`` + xxh3_128 of the same
    bytes on one thread, against ``readinto`` alone, pair by pair (row fields)."""
    plain, hashed = _Series(), _Series()
    for i in range(count):
        for side in _turns(i):
            if side == "raw":
                with plain.op(nbytes):
                    raw.get(i)
            else:
                with hashed.op(nbytes):
                    raw.get_and_hash(i)
    g, rg = hashed.gbps(), plain.gbps()
    return {"checksum_ceiling": _sig(g / rg, 3) if g and rg else None, "checksum_ceiling_op": "readinto + xxh3_128"}


def _turns(i: int) -> tuple[str, str]:
    """Which side goes first in the ``i``-th pair: they take turns, so neither always meets
    the state (fresh pages, a busy server, warm caches) that the other one leaves."""
    return ("raw", "ours") if i % 2 == 0 else ("ours", "raw")


def _warm(store: LMCBackendInterface, key: CacheEngineKey, chunk: torch.Tensor) -> None:
    """One untimed put + get, so lazy setup (threads, connections, pools) is not timed."""
    store.put(key, chunk)
    got = store.get(key)
    del got


def _cleanup(
    store: LMCBackendInterface | None,
    reopen: Callable[[], LMCBackendInterface] | None,
    written: list[CacheEngineKey],
    raw: _RawMedium,
    kind: str,
    url: str,
    model: str,
    made_dirs: Sequence[str] = (),
) -> None:
    try:
        if store is None and reopen is not None and written:
            with contextlib.suppress(Exception):
                store = reopen()
        if store is not None:
            _remove_all(store, written)
            with contextlib.suppress(Exception):
                store.close()
    finally:
        try:
            raw.cleanup()
            if kind in ("disk", "hybrid"):
                _remove_empty_model_dirs(url, model)
        finally:
            _remove_empty_dirs(made_dirs)


def _missing_dirs(url: str) -> list[str]:
    """The directories of a disk store at ``url`` that do not exist yet, deepest first."""
    if store_kind(url) != "disk":
        return []
    path = os.path.abspath(os.path.expanduser(url[len("file://") :] if url.startswith("file://") else url))
    missing: list[str] = []
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty_dirs(dirs: Sequence[str]) -> None:
    """``rmdir`` each of ``dirs`` (deepest first) that is empty: never a file in them."""
    for d in dirs:
        with contextlib.suppress(OSError):
            os.rmdir(d)


#: Removes in flight at once at the end of a run (the backends are thread-safe).
_CLEANUP_WORKERS = 16


def _remove_all(store: LMCBackendInterface, keys: Sequence[CacheEngineKey]) -> None:
    """``store.remove`` of every key, several at a time; failures are skipped.

    One at a time, a remote store 30 ms away (two round trips per remove on S3) took
    over 4 s for a default run's 66 chunks, and ``lmcache bench`` stopped by Ctrl-C
    has only a few seconds before the process ends.
    """

    def remove(k: CacheEngineKey) -> None:
        with contextlib.suppress(Exception):
            store.remove(k)

    unique = list(dict.fromkeys(keys))
    if len(unique) < 2:
        for k in unique:
            remove(k)
        return
    from concurrent.futures import ThreadPoolExecutor

    workers = min(_CLEANUP_WORKERS, len(unique))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-cleanup") as pool:
        list(pool.map(remove, unique))


def _remove_empty_model_dirs(url: str, model: str) -> None:
    """Remove the directories our private model name created, if empty now."""
    if store_kind(url) != "disk":
        return
    from lmcache_core import layout

    root = os.path.abspath(os.path.expanduser(url[len("file://") :] if url.startswith("file://") else url))
    for fmt in ("vllm", "huggingface"):
        top = os.path.join(root, *layout.model_prefix(fmt, model).split("/"))
        for dirpath, _dirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        fmt_dir = os.path.join(root, fmt)
        with contextlib.suppress(OSError):
            os.rmdir(fmt_dir)  # only when no other model lives there


# -- output ------------------------------------------------------------------------------

_TABLE_COLUMNS = (
    ("store", "store"),
    ("op", "op"),
    ("gbps", "GB/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("raw_op", "raw medium"),
    ("raw_gbps", "raw GB/s"),
    ("ratio", "ratio"),
    ("samples", "n"),
)


def format_table(rows: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """The rows as a plain-text (or Markdown) table, for scripts and docs."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v >= 100:
                return f"{v:.0f}"
            return f"{v:.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"
        return str(v)

    head = [title for _, title in _TABLE_COLUMNS]
    body = [[cell(r.get(k)) for k, _ in _TABLE_COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)
