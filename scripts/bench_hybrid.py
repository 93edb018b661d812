#!/usr/bin/env python3
"""Hybrid read-through: first get of N remote chunks (remote read + local fill)
vs the second get of the same chunks (served by the local tier).

Puts N chunks into the remote with a remote-only backend, opens a fresh hybrid
(memory, disk or memory+disk in front of that remote), then times each get
twice, one by one and as one ``batched_get``. Starts a throwaway redis-server
(or moto S3 server with ``--remote s3``) on a free loopback port unless
``--remote-url`` names one. Prints a table; ``--json FILE`` writes the figures.

    python scripts/bench_hybrid.py --count 16 --chunk-mb 32 --local memory
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from bench_servers import S3_ENV, make_bucket, redis_server, s3_server  # scripts/ is on sys.path

from lmcache_core import CacheEngineKey, LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.config import mask_url
from lmcache_core.storage_backend import CreateStorageBackend
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend

GB = 1024**3
MODEL = "bench/hybrid-read-through"


@contextlib.contextmanager
def remote_store(kind: str, url: str | None) -> Iterator[str]:
    if url:
        yield url
    elif kind == "redis":
        with redis_server() as u:
            yield f"{u}?prefix=bench-hybrid:"
    else:
        with s3_server() as endpoint:
            make_bucket(endpoint, "bench")
            yield (
                f"s3://bench/hybrid?endpoint_url={endpoint}&key={S3_ENV['AWS_ACCESS_KEY_ID']}"
                f"&secret={S3_ENV['AWS_SECRET_ACCESS_KEY']}"
            )


def _masked(url: str | None) -> str | None:
    return mask_url(url) if url else url


def summarise(name: str, seconds: list[float], nbytes: int) -> dict[str, Any]:
    total = sum(seconds)
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "op": name,
        "gbps": round(nbytes * len(seconds) / total / 1e9, 3),
        "p50_ms": round(statistics.median(seconds) * 1e3, 2),
        "p99_ms": round(p99 * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--remote", choices=["redis", "s3"], default="redis")
    ap.add_argument("--remote-url", default=None, help="use this remote instead of starting a server")
    ap.add_argument("--local", choices=["memory", "disk", "memory+disk"], default="memory")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--chunk-mb", type=float, default=32.0, help="chunk size (bf16, [L,2,256,8,128])")
    ap.add_argument("--pipelined", action="store_true", help="use the pipelined remote backend")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    layers = max(1, round(args.chunk_mb * 2**20 / (2 * 256 * 8 * 128 * 2)))
    shape = (layers, 2, 256, 8, 128)
    chunk = torch.randn(shape).to(torch.bfloat16)
    nbytes = chunk.numel() * chunk.element_size()
    keys = [CacheEngineKey("vllm", MODEL, 1, 0, f"{i:064x}") for i in range(args.count)]
    budget_gb = 2 * args.count * nbytes / GB

    with tempfile.TemporaryDirectory() as work, remote_store(args.remote, args.remote_url) as url:
        meta = LMCacheEngineMetadata(MODEL, kv_dtype=chunk.dtype, kv_shape=shape)
        remote_cfg = LMCacheEngineConfig.from_defaults(local_device=None, remote_url=url, remote_timeout=30)
        with LMCRemoteBackend(remote_cfg, meta, "cpu") as writer:
            for k in keys:
                writer.put(k, chunk)
        fields: dict[str, Any] = {
            "remote_url": url,
            "remote_timeout": 30,
            "pipelined_backend": args.pipelined,
            "max_local_cache_size": budget_gb,
            "local_device": "cpu" if "memory" in args.local else None,
        }
        if "disk" in args.local:
            fields["local_disk"] = str(Path(work) / "disk")
            fields["max_local_disk_size"] = budget_gb
        rows = []
        for mode in ("get", "batched_get"):
            hybrid = CreateStorageBackend(LMCacheEngineConfig.from_defaults(**fields), meta, "cpu")
            assert isinstance(hybrid, LMCHybridBackend)
            for label in ("first (remote + fill)", "second (local)"):
                if mode == "get":
                    times = []
                    for k in keys:
                        t0 = time.perf_counter()
                        got = hybrid.get(k)
                        times.append(time.perf_counter() - t0)
                        assert got is not None and got.shape == chunk.shape
                        del got
                else:
                    t0 = time.perf_counter()
                    got_all = hybrid.batched_get(keys)
                    elapsed = time.perf_counter() - t0
                    assert all(g is not None for g in got_all)
                    del got_all
                    times = [elapsed / len(keys)] * len(keys)
                rows.append(summarise(f"{mode} {label}", times, nbytes))
            hybrid.close()
            # Start the batched round from an empty local tier again.
            with LMCRemoteBackend(remote_cfg, meta, "cpu") as reader:
                assert reader.contains(keys[0])
            if "disk" in args.local:
                import shutil

                shutil.rmtree(Path(work) / "disk", ignore_errors=True)
        with LMCRemoteBackend(remote_cfg, meta, "cpu") as cleaner:
            for k in keys:
                cleaner.remove(k)

    first = {r["op"].split()[0]: r for r in rows if "first" in r["op"]}
    second = {r["op"].split()[0]: r for r in rows if "second" in r["op"]}
    print(f"hybrid {args.local} + {args.remote}: {args.count} chunks of {nbytes / 2**20:.1f} MiB bf16")
    print(f"{'operation':<34} {'GB/s':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for r in rows:
        print(f"{r['op']:<34} {r['gbps']:>8.3f} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f}")
    for mode in first:
        print(f"{mode}: second/first speed-up {second[mode]['gbps'] / first[mode]['gbps']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "remote_url": _masked(args.remote_url)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
