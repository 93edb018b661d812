#!/usr/bin/env python
"""Our tiers beside LMCache 0.5.6's own backends, on the reference workload, in one run.

Issue 7 asks for every tier at or above LMCache's figure on this machine kind.
Published figures come from another machine; this script measures both on this
one: bf16 chunks of shape [32, 2, 256, 8, 128] (32 MiB), the same chunks (same
seed), the same redis-server, the same filesystem, and the raw medium beside them.

LMCache lives in its own virtual environment (its dependencies pin numpy and
others that ours need not follow), made once with::

    python -m venv /opt/lmc && /opt/lmc/bin/pip install torch==2.13.0 lmcache==0.5.6

then::

    python scripts/bench_lmcache.py --lmcache-python /opt/lmc/bin/python \\
        [--count 8] [--repeat 3] [--json out.json] [--markdown docs/LMCACHE.md]

Each repeat runs every tier on both sides, LMCache's in a child process of that
interpreter (``--side lmcache``; this file imports nothing of ours there), ours
in this process, the order alternating between repeats. LMCache's backends are
built the way its ``StorageManager`` builds them from an ``LMCacheEngineConfig``
and driven as ``StorageManager.batched_put``/``get`` drive them: allocate a
memory object from its pool, copy the chunk in, ``batched_submit_put_task``.

Tiers: ``memory`` (LocalCPUBackend / ``cpu://``), ``disk`` (LocalDiskBackend /
a directory), ``fs`` (LMCache's ``fs://`` remote connector / our
``fsspec+file://`` remote), ``redis`` (LMCache's redis-py connector and its
native ``resp://`` client / our ``redis://``). Operations: ``put`` (memory,
blocking), ``put_nonblocking`` (submit all, GB/s until every chunk is stored:
in the page cache for files, acknowledged by Redis), ``get`` (hot; the memory
tier's get is zero-copy on both sides, so ``get+copy`` copies the chunk out into
a warm tensor), ``get_cold`` (after dropping the page cache; root only), and
``close`` (seconds; LMCache's is run in a thread and given up after
``--close-timeout``). Every get is checked bit for bit against the chunk put.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import torch

SHAPE: tuple[int, ...] = (32, 2, 256, 8, 128)
DTYPE = torch.bfloat16
TIERS = ("memory", "disk", "fs", "redis")
RESULT_TAG = "LMCBENCH-RESULT "
# Issue 7's table: LMCache 0.5.6 on its reference machine (GB/s), for the report.
PUBLISHED = {
    ("memory", "put"): "14",
    ("memory", "get"): "zero-copy",
    ("disk", "put_nonblocking"): "4.7",
    ("disk", "get"): "8.9",
    ("disk", "get_cold"): "1.6",
    ("fs", "put_nonblocking"): "1.9",
    ("fs", "get"): "7.1",
    ("fs", "get_cold"): "1.7",
    ("redis", "put_nonblocking"): "0.43-0.66 (py) / 0.96 (resp)",
    ("redis", "get"): "0.65-0.83 (py) / 1.0-1.3 (resp)",
}

Result = dict[str, dict[str, Any]]  # op -> {"s", "n", "lat_ms", "note"} or {"error"}


def make_chunks(count: int, seed: int) -> list[torch.Tensor]:
    """The run's chunks; the same bytes in every process for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen).to(DTYPE) for _ in range(count)]


def chunk_bytes() -> int:
    return torch.Size(SHAPE).numel() * DTYPE.itemsize


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (bf16 as int16, so NaN patterns cannot compare unequal).

    Compared by numpy on one thread: ``torch.equal`` runs on torch's OpenMP pool,
    whose workers then spin on the other core for a while, into the next timed
    get. That slowed our reads (which use both cores) to about half and left
    LMCache's single-threaded reads as they were: a check's cost, not a get's.
    """
    import numpy as np

    return bool(
        np.array_equal(a.reshape(-1).view(torch.int16).numpy(), b.reshape(-1).view(torch.int16).numpy())
    )


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Timer:
    """Per-chunk latencies and the wall time of one phase."""

    def __init__(self) -> None:
        self.lat_ms: list[float] = []
        self.t0 = time.perf_counter()
        self.s: float | None = None

    @contextmanager
    def op(self) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.lat_ms.append((time.perf_counter() - t) * 1e3)

    def done(self, n: int, note: str = "", *, wall: bool = False) -> dict[str, Any]:
        """The phase's result: its seconds are the sum of the timed ops (checks
        between them excluded), or with ``wall`` the time since the timer started."""
        self.s = time.perf_counter() - self.t0 if wall else sum(self.lat_ms) / 1e3
        return {"s": self.s, "n": n, "lat_ms": self.lat_ms, "note": note}


def timed_close(close: Callable[[], Any], timeout: float) -> dict[str, Any]:
    """``close()`` in a daemon thread; seconds, or a hang after ``timeout``."""
    box: dict[str, str] = {}

    def run() -> None:
        try:
            close()
        except BaseException as exc:  # noqa: BLE001 - reported, not raised
            box["error"] = f"{type(exc).__name__}: {exc}"

    t0 = time.perf_counter()
    th = threading.Thread(target=run, daemon=True, name="close-check")
    th.start()
    th.join(timeout)
    s = time.perf_counter() - t0
    if th.is_alive():
        return {"error": f"close() hung (no return after {timeout:.0f} s)", "hung": True}
    if "error" in box:
        return {"error": box["error"]}
    return {"s": s, "n": 0, "lat_ms": [], "note": ""}


# -- LMCache's side (runs under --lmcache-python; imports nothing of ours) ---------------------


def _lmc_tier(tier: str, variant: str, chunks: list[torch.Tensor], workdir: str, redis_port: int,
              close_timeout: float) -> Result:  # fmt: skip
    """LMCache's side of one tier: ``chunks[:-1]`` timed, the last one a warm-up."""
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.event_manager import EventManager
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.storage_manager import StorageManager

    *xs, warm_chunk = chunks
    n = len(xs)
    gib = chunk_bytes() / 1024**3
    kw: dict[str, Any] = {"chunk_size": 256, "max_local_cpu_size": (2 * n + 4) * gib,
                          "local_cpu": tier == "memory", "local_disk": None, "max_local_disk_size": 0,
                          "remote_url": None}  # fmt: skip
    if tier == "disk":
        kw.update(local_disk=workdir + "/", max_local_disk_size=(n + 4) * gib)
    elif tier == "fs":
        kw.update(remote_url=f"fs://localhost:0{workdir}", remote_serde="naive")  # needs a host:port
    elif tier == "redis":
        scheme = "resp" if variant == "resp" else "redis"
        kw.update(remote_url=f"{scheme}://127.0.0.1:{redis_port}", remote_serde="naive")
        if variant == "resp":
            kw["extra_config"] = {"save_chunk_meta": False}  # its adapter requires this
    meta = LMCacheMetadata(model_name="lmcbench", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=DTYPE, kv_shape=SHAPE, chunk_size=256)  # fmt: skip
    sm = StorageManager(LMCacheEngineConfig.from_defaults(**kw), meta, EventManager())
    out: Result = {}
    try:
        cpu = sm.storage_backends["LocalCPUBackend"]
        name = {"memory": "LocalCPUBackend", "disk": "LocalDiskBackend"}.get(tier, "RemoteBackend")
        backend = sm.storage_backends[name]
        shape, dtype = meta.get_shapes()[0], meta.get_dtypes()[0]
        # Touch the whole allocator pool once, untimed: a serving process has it warm.
        warm = []
        while (m := cpu.allocate(shape, dtype, eviction=False, busy_loop=False)) is not None:
            m.tensor.zero_()
            warm.append(m)
        for m in warm:
            m.ref_count_down()
        keys = [CacheEngineKey("lmcbench", 1, 0, 1000 + i, DTYPE) for i in range(n)]

        def fill(x: torch.Tensor) -> Any:
            m = cpu.allocate(shape, dtype)
            if m is None:
                raise RuntimeError("LocalCPUBackend.allocate returned None")
            m.tensor.view(-1).copy_(x.reshape(-1).view(m.tensor.dtype))  # same bytes, its layout
            return m

        def check(m: Any, x: torch.Tensor, what: str) -> None:
            if m is None or not same(m.tensor.view(-1).view(DTYPE), x):
                raise RuntimeError(f"{what}: {'miss' if m is None else 'WRONG BYTES'}")

        def put_all(ks: list[Any], chunks: list[torch.Tensor]) -> dict[str, Any]:
            if tier == "memory":
                t = Timer()
                for k, x in zip(ks, chunks, strict=True):
                    with t.op():
                        m = fill(x)
                        cpu.submit_put_task(k, m)
                        m.ref_count_down()  # as StorageManager.batched_put does
                return t.done(len(ks), "allocate + copy_ + submit_put_task")
            done: dict[Any, float] = {}
            lock = threading.Lock()

            def on_done(k: Any) -> None:
                with lock:
                    done[k] = time.perf_counter()

            t = Timer()
            objs = [fill(x) for x in chunks]
            backend.batched_submit_put_task(ks, objs, on_complete_callback=on_done)
            for m in objs:
                m.ref_count_down()
            deadline = time.perf_counter() + 120
            while len(done) < len(ks) or not all(backend.contains(k) for k in ks):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{len(done)}/{len(ks)} puts stored after 120 s")
                time.sleep(0.0005)
            res = t.done(len(ks), "allocate + copy + batched_submit_put_task, until stored", wall=True)
            res["lat_ms"] = [(done[k] - t.t0) * 1e3 for k in ks]
            return res

        # One chunk through put and get, untimed, as on our side: first-use costs stay out.
        warm_key = CacheEngineKey("lmcbench", 1, 0, 999, DTYPE)
        put_all([warm_key], [warm_chunk])
        m = backend.get_blocking(warm_key)
        check(m, warm_chunk, "warm-up get")
        m.ref_count_down()
        out["put" if tier == "memory" else "put_nonblocking"] = put_all(keys, xs)

        def gets(op: str, copy_out: bool = False) -> None:
            dst = torch.zeros(SHAPE, dtype=DTYPE) if copy_out else None
            t = Timer()
            for i, k in enumerate(keys):
                with t.op():
                    m = backend.get_blocking(k)
                    if dst is not None and m is not None:
                        dst.view(-1).copy_(m.tensor.view(-1).view(DTYPE))
                # Checked and released outside the timed region, before the next read,
                # as our side drops each chunk: both allocators may reuse warm memory.
                check(m, xs[i], f"{op} {i}")
                m.ref_count_down()
            out[op] = t.done(n)

        if tier == "memory":
            gets("get")
            m = cpu.get_blocking(keys[0])  # takes cpu_lock itself
            with cpu.cpu_lock:
                zero_copy = m is cpu.hot_cache[keys[0]]
            m.ref_count_down()
            out["get"]["note"] = "zero-copy (the cached object itself)" if zero_copy else "a copy"
            gets("get+copy", copy_out=True)
        else:
            gets("get")
            if tier in ("disk", "fs") and os.geteuid() == 0:
                drop_caches()
                gets("get_cold")
    except Exception as exc:  # noqa: BLE001 - one failed tier must not hide the others
        out["error"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["close"] = timed_close(sm.close, close_timeout)
    return out


# -- our side ---------------------------------------------------------------------------------


def _our_tier(tier: str, chunks: list[torch.Tensor], workdir: str, redis_url: str, repeat: int) -> Result:
    """Our side of one tier: ``chunks[:-1]`` timed, the last one a warm-up."""
    from lmcache_core.config import LMCacheEngineMetadata
    from lmcache_core.key import CacheEngineKey
    from lmcache_core.storage_backend import open_backend

    *xs, warm_chunk = chunks
    n = len(xs)
    model = f"lmcbench-{repeat}"
    meta = LMCacheEngineMetadata(model_name=model, kv_dtype=DTYPE, kv_shape=SHAPE)
    keys = [CacheEngineKey("vllm", model, 1, 0, f"{i:064x}") for i in range(n)]
    warm_key = CacheEngineKey("vllm", model, 1, 0, "f" * 64)
    url = {"memory": "cpu://", "disk": workdir, "fs": f"fsspec+file://{workdir}", "redis": redis_url}[tier]
    opts: dict[str, Any] = {}
    if tier == "memory":
        opts["max_local_cache_size"] = (n + 2) * chunk_bytes() / 1024**3  # the pool, touched at open
    elif tier == "disk":
        opts["max_local_disk_size"] = float(n + 4)
    out: Result = {}

    def gets(store: Any, op: str, copy_out: bool = False) -> None:
        dst = torch.zeros(SHAPE, dtype=DTYPE) if copy_out else None
        t = Timer()
        bad = None
        for i, k in enumerate(keys):
            with t.op():
                got = store.get(k)
                if dst is not None and got is not None:
                    dst.copy_(got)
            # Checked outside the timed region; a pool buffer goes back before the next read.
            if got is None or not same(got, xs[i]):
                bad = bad or f"{op} {i}: {'miss' if got is None else 'WRONG BYTES'}"
            del got
        if bad:
            raise RuntimeError(bad)
        out[op] = t.done(n)

    def opened() -> Any:
        """A store that has put and read one chunk, untimed, as on LMCache's side."""
        store = open_backend(url, dst_device="cpu", metadata=meta, **opts)
        if not store.contains(warm_key):
            store.put(warm_key, warm_chunk)
        got = store.get(warm_key)
        if got is None or not same(got, warm_chunk):
            raise RuntimeError("warm-up get: miss or wrong bytes")
        return store

    store = opened()
    try:
        if tier == "memory":
            t = Timer()
            for k, x in zip(keys, xs, strict=True):
                with t.op():
                    store.put(k, x)
            out["put"] = t.done(n, "put: copy_ into the warm slot pool")
            gets(store, "get")
            a, b = store.get(keys[0]), store.get(keys[0])
            zero_copy = a is not None and b is not None and a.data_ptr() == b.data_ptr()
            out["get"]["note"] = "zero-copy (a view of the cached slot)" if zero_copy else "a copy"
            del a, b
            gets(store, "get+copy", copy_out=True)
        else:
            t = Timer()
            for k, x in zip(keys, xs, strict=True):
                with t.op():
                    store.put(k, x, blocking=False)
            store.close()  # the drain: returns once every queued put is stored
            out["put_nonblocking"] = t.done(n, "put(blocking=False) x n, then close()", wall=True)
            store = opened()
            gets(store, "get")
            if tier in ("disk", "fs") and os.geteuid() == 0:
                drop_caches()
                gets(store, "get_cold")
    except Exception as exc:  # noqa: BLE001 - reported beside LMCache's errors
        out["error"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["close"] = timed_close(store.close, 60.0)
    return out


# -- raw medium (this process, same files system and server) ----------------------------------


def _raw(xs: list[torch.Tensor], workdir: str, redis_url: str) -> Result:
    import redis

    from lmcache_core.bench import _payload  # the byte view the main bench writes from

    n = len(xs)
    out: Result = {}
    views = [_payload(x) for x in xs]
    dst = torch.zeros(chunk_bytes(), dtype=torch.uint8)
    dview = _payload(dst)
    t = Timer()
    for x in xs:
        with t.op():
            dst.copy_(x.reshape(-1).view(torch.uint8))
    out["copy_"] = t.done(n, "copy_ into a warm tensor")
    paths = [os.path.join(workdir, f"raw{i}.bin") for i in range(n)]
    t = Timer()
    for v, p in zip(views, paths, strict=True):
        with t.op(), open(p, "wb", buffering=0) as f:
            f.write(v)
    out["write"] = t.done(n, "one write() per chunk into a new file (page cache)")

    def read(op: str) -> None:
        t = Timer()
        for p in paths:
            with t.op(), open(p, "rb", buffering=0) as f:
                if f.readinto(dview) != len(dview):
                    raise RuntimeError(f"short read of {p}")
        out[op] = t.done(n, "readinto a warm buffer")

    read("readinto")
    if os.geteuid() == 0:
        drop_caches()
        read("readinto_cold")
    client = redis.Redis.from_url(redis_url)
    try:
        t = Timer()
        for i, v in enumerate(views):
            with t.op():
                client.set(f"lmcbench-raw:{i}", v)
        out["redis-py SET"] = t.done(n)
        t = Timer()
        for i in range(n):
            with t.op():
                got = client.get(f"lmcbench-raw:{i}")
            if got is None or len(got) != len(views[i]):
                raise RuntimeError("raw GET returned the wrong size")
            del got
        out["redis-py GET"] = t.done(n)
        client.delete(*[f"lmcbench-raw:{i}" for i in range(n)])
    finally:
        client.close()
    return out


# -- the run --------------------------------------------------------------------------------


def _gbps(r: dict[str, Any]) -> float | None:
    if "s" not in r or not r.get("n") or not r["s"]:
        return None
    return float(r["n"] * chunk_bytes() / r["s"] / 1e9)


def _run_child(py: str, side: str, tier: str, variant: str, args: argparse.Namespace, workdir: str,
               port: int, repeat: int) -> Result:  # fmt: skip
    cmd = [py, os.path.abspath(__file__), "--side", side, "--tier", tier, "--variant", variant,
           "--count", str(args.count), "--seed", str(args.seed), "--workdir", workdir,
           "--redis-port", str(port), "--close-timeout", str(args.close_timeout),
           "--repeat-index", str(repeat)]  # fmt: skip
    env = dict(os.environ, LMCACHE_LOG_LEVEL="ERROR")
    if side == "lmcache":
        env["PYTHONPATH"] = ""  # its own environment only
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return {"error": {"error": f"{side} child ran past 300 s"}}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])  # type: ignore[no-any-return]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": {"error": f"{side} child exited {proc.returncode}: {' | '.join(tail)}"}}


def _summarise(runs: list[Result]) -> dict[str, dict[str, Any]]:
    """op -> median GB/s (or close seconds), p50/p99 over all repeats, notes, errors."""
    ops: dict[str, dict[str, Any]] = {}
    for rep, run in enumerate(runs):
        for op, r in run.items():
            e = ops.setdefault(op, {"gbps": [], "s": [], "lat": [], "errors": [], "note": ""})
            e.setdefault("by_repeat", [None] * len(runs))
            if "error" in r:
                e["errors"].append(r["error"])
                continue
            e["note"] = r.get("note") or e["note"]
            e["s"].append(r["s"])
            e["lat"].extend(r["lat_ms"])
            if (g := _gbps(r)) is not None:
                e["gbps"].append(g)
                e["by_repeat"][rep] = g
    for e in ops.values():
        e["median_gbps"] = statistics.median(e["gbps"]) if e["gbps"] else None
        e["median_s"] = statistics.median(e["s"]) if e["s"] else None
        lat = sorted(e.pop("lat"))
        e["p50_ms"] = lat[len(lat) // 2] if lat else None
        e["p99_ms"] = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else None
        e["errors"] = sorted(set(e["errors"]))
    return ops


# How LMCache's side of a row is named (``-``: the tier's only backend).
VARIANT_NAMES = {"py": "redis:// (redis-py)", "resp": "resp:// (native C++)"}

RAW_FOR = {
    ("memory", "put"): "copy_",
    ("memory", "get+copy"): "copy_",
    ("disk", "put_nonblocking"): "write",
    ("disk", "get"): "readinto",
    ("disk", "get_cold"): "readinto_cold",
    ("fs", "put_nonblocking"): "write",
    ("fs", "get"): "readinto",
    ("fs", "get_cold"): "readinto_cold",
    ("redis", "put_nonblocking"): "redis-py SET",
    ("redis", "get"): "redis-py GET",
}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    raw = summary["raw"]
    for tier in summary["tiers"]:
        ours = summary["ours"][tier]
        lmc_sides = {v: summary["lmcache"][f"{tier}:{v}"] for v in summary["variants"][tier]}
        canonical = ["put", "get", "get+copy"] if tier == "memory" else ["put_nonblocking", "get", "get_cold"]
        seen = [op for side in (ours, *lmc_sides.values()) for op in side if op not in ("close", "error")]
        ops = [op for op in canonical if op in seen] + sorted(set(seen) - set(canonical))
        for op in [*ops, "close"]:
            o = ours.get(op, {})
            for variant, lmc in lmc_sides.items():
                lo = lmc.get(op, {})
                row: dict[str, Any] = {"tier": tier, "op": op, "lmcache": VARIANT_NAMES.get(variant, tier)}
                if op == "close":
                    row["unit"] = "s"
                    row["ours"] = o.get("median_s")
                    row["theirs"] = lo.get("median_s")
                    row["ours_errors"] = o.get("errors", [])
                    row["theirs_errors"] = lo.get("errors", [])
                else:
                    row["unit"] = "GB/s"
                    row["ours"] = o.get("median_gbps")
                    row["theirs"] = lo.get("median_gbps")
                    row["ours_p50_ms"], row["theirs_p50_ms"] = o.get("p50_ms"), lo.get("p50_ms")
                    row["ours_errors"] = o.get("errors", []) + ours.get("error", {}).get("errors", [])
                    row["theirs_errors"] = lo.get("errors", []) + lmc.get("error", {}).get("errors", [])
                    rk = RAW_FOR.get((tier, op))
                    row["raw_op"] = rk
                    row["raw"] = raw.get(rk, {}).get("median_gbps") if rk else None
                    if all("zero-copy" in side.get("note", "") for side in (o, lo)):
                        row["note"] = "both zero-copy: no bytes move"
                row["published"] = PUBLISHED.get((tier, op), "")
                if row["unit"] == "GB/s" and row["ours"] and row["theirs"] and not row.get("note"):
                    row["ratio"] = row["ours"] / row["theirs"]
                    row.update(_paired(o.get("by_repeat", []), lo.get("by_repeat", [])))
                    row["ours_by_repeat"], row["theirs_by_repeat"] = o.get("by_repeat"), lo.get("by_repeat")
                rows.append(row)
    return rows


def _paired(ours: list[float | None], theirs: list[float | None]) -> dict[str, Any]:
    """Ratios of the two sides within each repeat, which ran back to back.

    The VM's memory and page-cache speed drifts between repeats (20-30 %), and a
    ratio of two medians mixes that drift in; a ratio within one repeat mostly
    does not. ``ahead`` counts the repeats where ours was at least as fast.
    """
    pairs = sorted(o / t for o, t in zip(ours, theirs, strict=False) if o and t)
    if not pairs:
        return {}
    return {"paired_median": statistics.median(pairs), "paired_min": pairs[0], "paired_max": pairs[-1],
            "ahead": sum(1 for x in pairs if x >= 1.0), "pairs": len(pairs)}  # fmt: skip


def _table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["tier", "op", "LMCache", "LMCache GB/s", "ours GB/s", "ours / LMCache", "paired (min-max)", "ours ahead",
            "raw medium", "raw GB/s", "published LMCache"]  # fmt: skip
    lines = []
    for r in rows:
        if r["unit"] == "s":
            theirs = "hung" if any("hung" in e for e in r["theirs_errors"]) else _fmt(r["theirs"]) + " s"
            ours = "hung" if any("hung" in e for e in r["ours_errors"]) else _fmt(r["ours"]) + " s"
            cells = [r["tier"], "close()", r["lmcache"], theirs, ours, "", "", "", "", "", ""]
        else:
            theirs = "error" if r["theirs_errors"] else _fmt(r["theirs"])
            ours = "error" if r["ours_errors"] else _fmt(r["ours"])
            ratio = r.get("note") or _fmt(r.get("ratio"))
            paired = ahead = ""
            if "pairs" in r:
                paired = f"{r['paired_median']:.2f} ({r['paired_min']:.2f}-{r['paired_max']:.2f})"
                ahead = f"{r['ahead']} of {r['pairs']}"
            cells = [r["tier"], r["op"], r["lmcache"], theirs, ours, ratio, paired, ahead, r.get("raw_op") or "",
                     _fmt(r.get("raw")), r["published"]]  # fmt: skip
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*c) for c in lines)])


def _errors(rows: list[dict[str, Any]]) -> list[str]:
    seen = []
    for r in rows:
        for side in ("ours", "theirs"):
            for e in r[f"{side}_errors"]:
                line = f"{'ours' if side == 'ours' else r['lmcache']} {r['op']}: {e}"
                if line not in seen:
                    seen.append(line)
    return seen


def main_parent(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import redis
    from bench_servers import redis_server

    from lmcache_core.bench import machine_info

    if not os.path.exists(args.lmcache_python):
        print(f"no interpreter at {args.lmcache_python}; see this script's docstring", file=sys.stderr)
        return 2
    probe = subprocess.run(
        [args.lmcache_python, "-c", "import importlib.metadata as m; print(m.version('lmcache'))"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""),
    )  # fmt: skip
    if probe.returncode != 0:
        print(f"{args.lmcache_python} cannot import lmcache: {probe.stderr.strip()[-300:]}", file=sys.stderr)
        return 2
    lmc_version = probe.stdout.strip()
    tiers = [t for t in args.tiers.split(",") if t]
    if bad := [t for t in tiers if t not in TIERS]:
        print(f"unknown tiers {bad}; choose from {TIERS}", file=sys.stderr)
        return 2
    variants = {t: (["py", "resp"] if t == "redis" else ["-"]) for t in tiers}
    xs = make_chunks(args.count + 1, args.seed)  # the last one is each side's warm-up
    base = tempfile.mkdtemp(prefix="lmcbench-", dir=args.dir)
    ours_runs: dict[str, list[Result]] = {t: [] for t in tiers}
    lmc_runs: dict[str, list[Result]] = {f"{t}:{v}": [] for t in tiers for v in variants[t]}
    raw_runs: list[Result] = []
    started = datetime.now(timezone.utc)
    load = os.getloadavg()
    try:
        with redis_server() as redis_url:
            port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
            for rep in range(args.repeat):
                print(f"repeat {rep + 1}/{args.repeat}", file=sys.stderr, flush=True)
                rawdir = os.path.join(base, f"raw{rep}")
                os.makedirs(rawdir)
                raw_runs.append(_raw(xs[:-1], rawdir, redis_url))
                shutil.rmtree(rawdir)
                for tier in tiers:
                    for variant in variants[tier]:
                        sides = ["lmcache", "ours"] if rep % 2 == 0 else ["ours", "lmcache"]
                        for side in sides:
                            if side == "ours" and variant not in ("-", "py"):
                                continue
                            if tier == "redis":  # each side starts from an empty server
                                with redis.Redis.from_url(redis_url) as client:
                                    client.flushdb()
                            wd = os.path.join(base, f"{side}-{tier}-{variant}-{rep}")
                            os.makedirs(wd)
                            print(f"  {tier} ({variant}): {side}", file=sys.stderr, flush=True)
                            # Both sides in a fresh child process: neither keeps warm
                            # heap or pools from an earlier tier or repeat.
                            if side == "lmcache":
                                lmc_runs[f"{tier}:{variant}"].append(
                                    _run_child(args.lmcache_python, "lmcache", tier, variant, args, wd, port, rep)
                                )
                            else:
                                ours_runs[tier].append(_run_child(sys.executable, "ours", tier, variant, args, wd, port, rep))
                            shutil.rmtree(wd, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary: dict[str, Any] = {
        "tiers": tiers,
        "variants": variants,
        "raw": _summarise(raw_runs),
        "ours": {t: _summarise(r) for t, r in ours_runs.items()},
        "lmcache": {k: _summarise(r) for k, r in lmc_runs.items()},
    }
    rows = _rows(summary)
    argv = sys.argv[1:]
    if "--note" in argv:  # prose, not part of the command anyone needs to repeat
        i = argv.index("--note")
        argv = [*argv[:i], "--note", "'...'", *argv[i + 2 :]]
    command = "python scripts/bench_lmcache.py " + " ".join(argv)
    info = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(), "lmcache": lmc_version,
            "count": args.count, "repeat": args.repeat, "chunk_shape": list(SHAPE), "dtype": "bfloat16",
            "load_at_start": [round(x, 2) for x in load], "command": command}  # fmt: skip
    print(_table(rows, markdown=False))
    for line in _errors(rows):
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "raw": summary["raw"]}, f, indent=1, default=str)
    if args.markdown:
        _write_markdown(args.markdown, info, rows, args.note)
    # LMCache's own failures (its close() hangs) are findings; ours are failures.
    return 1 if any(r["ours_errors"] for r in rows) else 0


def _write_markdown(path: str, info: dict[str, Any], rows: list[dict[str, Any]], note: str) -> None:
    m = info["machine"]
    text = f"""# Ours beside LMCache {info["lmcache"]}

Every tier of ours and of LMCache {info["lmcache"]}'s own storage backends, measured in one run
on this machine, on the reference workload of issue 7: bf16 chunks of shape
{info["chunk_shape"]} (32 MiB), {info["count"]} chunks, the same bytes on both sides, the
same redis-server and filesystem, the raw medium beside them. Generated by
`scripts/bench_lmcache.py` (its docstring says how LMCache is driven); do not edit.

* **Command**: `{info["command"]}`
* **Date**: {info["date"]}
* **Machine**: {m["cpu"]}, {m["cores"]} cores, {m["memory_gib"]} GiB, {m["os"]}, Python {m["python"]}, torch {m["torch"]}
* **Repeats**: {info["repeat"]} (GB/s are medians; the two sides alternate which goes first). "ours / LMCache" is
  the ratio of the medians; "paired" is the median of the ratios within each repeat (the two
  sides ran back to back), with the lowest and highest; "ours ahead" counts the repeats where
  ours was at least as fast.
* **Load average at start**: {info["load_at_start"]}
* **Published LMCache** is issue 7's table, from another machine; the LMCache columns here are this machine.

{_table(rows, markdown=True)}

"""
    errs = _errors(rows)
    if errs:
        text += "Errors and hangs:\n\n" + "\n".join(f"* {e}" for e in errs) + "\n\n"
    if note:
        text += note.strip() + "\n"
    with open(path, "w") as f:
        f.write(text)


def main_child(args: argparse.Namespace) -> None:
    """One side of one tier; prints one result line, then exits hard.

    ``os._exit``: LMCache's event-loop threads are not daemons, and after a hung
    ``close()`` they would keep the interpreter alive forever.
    """
    xs = make_chunks(args.count + 1, args.seed)
    try:
        if args.side == "lmcache":
            res = _lmc_tier(args.tier, args.variant, xs, args.workdir, args.redis_port, args.close_timeout)
        else:
            redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
            res = _our_tier(args.tier, xs, args.workdir, redis_url, args.repeat_index)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        res = {"error": {"error": f"{type(exc).__name__}: {exc}"}}
    print(RESULT_TAG + json.dumps(res), flush=True)
    sys.stderr.flush()
    os._exit(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--lmcache-python", help="an interpreter that has lmcache (see the docstring)")
    ap.add_argument("--count", type=int, default=8, help="chunks per tier and repeat")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiers", default=",".join(TIERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/var/tmp", help="where both sides' files go")
    ap.add_argument("--close-timeout", type=float, default=5.0, help="give LMCache's close() this long")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--note", default="")
    ap.add_argument("--side", choices=["parent", "lmcache", "ours"], default="parent", help=argparse.SUPPRESS)
    ap.add_argument("--repeat-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tier", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="-", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--redis-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.count < 1 or args.repeat < 1:
        ap.error("--count and --repeat must be at least 1")
    if args.side != "parent":
        main_child(args)
    if not args.lmcache_python:
        ap.error("--lmcache-python is required")
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
