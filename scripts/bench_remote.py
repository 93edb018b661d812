#!/usr/bin/env python
"""The remote tier beside its raw client, on the same bytes, in the same run (issue 3).

For S3 (moto's server in its own process on a free loopback port, or
``--s3-endpoint``/``--s3-url``) and Redis (a throwaway ``redis-server`` on a
free port when the binary exists, or ``--redis-url``), plain and pipelined:

* put / get / non-blocking put / batched_get against the raw client
  (s3fs ``pipe_file``/``cat_file``, redis-py ``SET``/``GET``) via
  ``lmcache_core.bench.run_bench``;
* the pipelined ``batched_get`` of ``--batch`` keys against the same number of
  sequential ``get()`` calls on the same store, interleaved round by round.

Prints tables and the issue's targets; writes JSON (``--json``).

    python scripts/bench_remote.py [--count 4] [--batch 16] [--rounds 5] \\
        [--s3-endpoint http://host:port --s3-url s3://bucket/prefix] [--redis-url redis://host:port/0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import secrets
import shutil
import statistics
import sys
import time
from importlib.util import find_spec
from typing import Any

import torch
from bench_servers import make_bucket, redis_server, s3_server  # scripts/ is on sys.path

from lmcache_core.bench import REFERENCE_SHAPE, format_table, machine_info, run_bench, url_target
from lmcache_core.config import LMCacheEngineMetadata, mask_url
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import open_backend

TARGET_RAW_RATIO = 0.8
TARGET_BATCH_SPEEDUP = {"s3": 1.5, "redis": 1.2}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batch_vs_sequential(
    url: str, options: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype, batch: int, rounds: int
) -> dict[str, Any]:
    """Pipelined ``batched_get(batch keys)`` against ``batch`` sequential ``get()`` on one store.

    Both read the same objects; rounds alternate the two so noise hits both alike.
    """
    model = f"lmcache-bench-{secrets.token_hex(4)}"
    keys = [CacheEngineKey("vllm", model, 1, 0, f"e{i:063x}") for i in range(batch)]
    nbytes = math.prod(shape) * dtype.itemsize
    gen = torch.Generator().manual_seed(1)
    meta = LMCacheEngineMetadata(model_name=model, kv_dtype=dtype, kv_shape=shape)
    store = open_backend(url, dst_device="cpu", metadata=meta, pipelined=True, **options)
    seq_ns: list[int] = []
    bat_ns: list[int] = []
    misses = 0
    try:
        for k in keys:
            store.put(k, torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype))
        del store.batched_get(keys[:2])[:]  # untimed warm-up: connections, threads
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            for k in keys:
                got = store.get(k)
                misses += got is None
                del got
            seq_ns.append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            got_all = store.batched_get(keys)
            bat_ns.append(time.perf_counter_ns() - t0)
            misses += sum(g is None for g in got_all)
            del got_all
    finally:
        for k in keys:
            with contextlib.suppress(Exception):
                store.remove(k)
        store.close()
    seq = statistics.median(seq_ns)
    bat = statistics.median(bat_ns)
    return {
        "store": mask_url(url) if "@" in url or "?" in url else url,
        "op": f"batched_get[{batch}] vs {batch} x get",
        "batched_gbps": round(batch * nbytes / bat, 4),
        "sequential_gbps": round(batch * nbytes / seq, 4),
        "batched_ms": round(bat / 1e6, 1),
        "sequential_ms": round(seq / 1e6, 1),
        "speedup": round(seq / bat, 3),
        "rounds": rounds,
        "misses": misses,
    }


def targets(rows: list[dict[str, Any]], speedups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets: store/raw ratio of put and get, pipelined batch speedup."""
    out: list[dict[str, Any]] = []
    for r in rows:
        if r["op"] in ("put", "get") and r.get("ratio") is not None:
            out.append(
                {
                    "target": f"{r['store']} {r['op']} >= {TARGET_RAW_RATIO}x {r['raw_op']}",
                    "measured": r["ratio"],
                    "met": r["ratio"] >= TARGET_RAW_RATIO,
                }
            )
    for s in speedups:
        kind = "redis" if s["store"].startswith(("redis", "rediss", "unix")) else "s3"
        need = TARGET_BATCH_SPEEDUP[kind]
        out.append(
            {
                "target": f"{s['store']} pipelined {s['op']} >= {need}x",
                "measured": s["speedup"],
                "met": s["speedup"] >= need,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=4, help="chunks per timed op (default 4)")
    ap.add_argument("--batch", type=int, default=16, help="keys per batched_get (default 16)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of batched vs sequential (default 5; single rounds vary by tens of percent)")
    ap.add_argument("--dtype", default="bfloat16", help="torch dtype (default bfloat16)")
    ap.add_argument("--shape", default=",".join(map(str, REFERENCE_SHAPE)), help="chunk shape (default 32 MiB bf16)")
    ap.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL instead of starting moto")
    ap.add_argument("--s3-url", default=None, help="s3://bucket/prefix (default s3://lmcache-bench/run)")
    ap.add_argument("--redis-url", default=None, help="Redis URL instead of starting redis-server")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-redis", action="store_true")
    ap.add_argument("--json", default="bench_remote.json", help="where to write the JSON report")
    args = ap.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    timeout = 60.0  # seconds per remote call: 16 x 32 MiB through moto is slow, not failed

    with contextlib.ExitStack() as stack:
        stores: list[tuple[str, str, dict[str, Any]]] = []  # (name, url, options)
        if not args.skip_s3:
            endpoint = args.s3_endpoint
            if endpoint is None:
                say("starting moto_server")
                endpoint = stack.enter_context(s3_server())
            s3_url = args.s3_url or "s3://lmcache-bench/run"
            make_bucket(endpoint, s3_url[len("s3://") :].split("/", 1)[0])
            opts = {"endpoint_url": endpoint, "remote_timeout": timeout}
            label = "s3 (moto, loopback)" if args.s3_endpoint is None else mask_url(s3_url)
            stores.append((label, s3_url, opts))
        if not args.skip_redis and find_spec("redis") is not None:
            redis_url = args.redis_url
            if redis_url is None and shutil.which("redis-server"):
                say("starting redis-server")
                redis_url = stack.enter_context(redis_server("pass --redis-url"))
            if redis_url:
                stores.append(("redis (loopback)" if args.redis_url is None else mask_url(redis_url), redis_url,
                               {"remote_timeout": timeout}))
        if not stores:
            say("nothing to benchmark")
            return 1

        bench_targets = []
        for name, url, opts in stores:
            bench_targets.append(url_target(url, name=name, options=opts))
            bench_targets.append(url_target(url, name=f"{name} pipelined", options={**opts, "pipelined": True}))
        report = run_bench(
            bench_targets, kv_shape=shape, dtype=args.dtype, count=args.count, batch=args.batch, progress=say
        )
        speedups = []
        for name, url, opts in stores:
            say(f"{name}: batched_get[{args.batch}] vs {args.batch} sequential get x{args.rounds}")
            row = batch_vs_sequential(url, opts, shape, dtype, args.batch, args.rounds)
            row["store"] = name
            speedups.append(row)

    goals = targets(report.rows, speedups)
    out = {**report.to_dict(), "batch_vs_sequential": speedups, "targets": goals, "machine": machine_info()}
    nbytes = math.prod(shape) * dtype.itemsize
    print(f"\n{args.count} chunks of shape {list(shape)} {args.dtype} ({nbytes / 2**20:.1f} MiB), batch {args.batch}")
    print(format_table(report.rows))
    print("\npipelined batched_get vs sequential get() on the same store (median of rounds)")
    for s in speedups:
        print(
            f"  {s['store']:<28} batched {s['batched_gbps']:.3f} GB/s ({s['batched_ms']:.0f} ms)  "
            f"sequential {s['sequential_gbps']:.3f} GB/s ({s['sequential_ms']:.0f} ms)  "
            f"speedup {s['speedup']:.2f}x" + (f"  [{s['misses']} misses]" if s["misses"] else "")
        )
    print("\ntargets")
    for g in goals:
        print(f"  {'met ' if g['met'] else 'MISS'}  {g['target']}: {g['measured']}")
    for err in report.errors:
        print(f"error: {err['store']}: {err['error']}", file=sys.stderr)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nJSON: {args.json}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
