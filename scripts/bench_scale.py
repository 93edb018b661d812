#!/usr/bin/env python
"""How index operations scale: 1k, 10k and 100k small chunks in memory and disk stores.

For each store and size N it measures, per operation: ``put`` while filling to
N, ``contains`` (hits and misses), ``put`` that evicts (the budget holds exactly
N chunks), ``list()``/``list_info()`` of all N (what ``lmcache ls`` does), the
disk tier's restart (index rebuilt from the directory), and the memory held
per indexed chunk (Python allocations, payload excluded: torch storage is not
traced). O(1) index operations show as flat per-op times across N.

    python scripts/bench_scale.py [--sizes 1000,10000,100000] [--chunk-bytes 512] [--json bench_scale.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import tracemalloc
from typing import Any, Callable

import torch

from lmcache_core.bench import machine_info
from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend

GB = 1024**3


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey("vllm", "scale/model", 1, 0, f"{i:064x}")


def per_op_us(fn: Callable[[int], Any], ids: range) -> float:
    t0 = time.perf_counter()
    for i in ids:
        fn(i)
    return round((time.perf_counter() - t0) / max(1, len(ids)) * 1e6, 2)


def held_per_chunk(store: LMCBackendInterface, chunk: torch.Tensor, n: int, extra: int) -> int:
    """Python memory the store holds per added chunk, over ``extra`` more puts (removed after).

    Traced separately from the timed fill: tracemalloc slows every allocation.
    """
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(extra):
        store.put(key(n + 20_000_000 + i), chunk)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    for i in range(extra):
        store.remove(key(n + 20_000_000 + i))
    return round(held / extra)


def measure(kind: str, n: int, chunk: torch.Tensor, root: str, samples: int) -> dict[str, Any]:
    nbytes = chunk.numel() * chunk.element_size()
    per_chunk = nbytes
    if kind == "disk":
        # A file is payload + a ~300-byte header: measure it, so the budget holds exactly n.
        probe_dir = tempfile.mkdtemp(dir=root)
        probe = LMCLocalDiskBackend(
            LMCacheEngineConfig.from_defaults(local_device=None, local_disk=probe_dir), dst_device="cpu"
        )
        probe.put(key(0), chunk)
        per_chunk = probe.used_bytes
        probe.close()
        shutil.rmtree(probe_dir)
    # The disk tier makes room for a put by an estimate (payload + 512) before it
    # knows the file size; the slack keeps that from evicting one chunk early.
    budget_gb = (n * per_chunk + 1024) / GB

    def open_store() -> LMCBackendInterface:
        if kind == "memory":
            cfg = LMCacheEngineConfig.from_defaults(local_device="cpu", max_local_cache_size=budget_gb)
            return LMCLocalBackend(cfg, None, "cpu")
        cfg = LMCacheEngineConfig.from_defaults(
            local_device=None, local_disk=f"{root}/disk-{n}", max_local_disk_size=budget_gb
        )
        return LMCLocalDiskBackend(cfg, None, "cpu")

    out: dict[str, Any] = {"store": kind, "chunks": n, "chunk_bytes": nbytes}
    store = open_store()
    # Before the fill, so these puts evict nothing (the budget holds exactly n).
    out["bytes_per_indexed_chunk"] = held_per_chunk(store, chunk, n, min(n, 2000))
    t0 = time.perf_counter()
    for i in range(n):
        store.put(key(i), chunk)
    fill = time.perf_counter() - t0
    out["put_fill_us"] = round(fill / n * 1e6, 2)
    step = max(1, n // samples)
    out["contains_hit_us"] = per_op_us(lambda i: store.contains(key(i)), range(0, n, step))
    out["contains_miss_us"] = per_op_us(lambda i: store.contains(key(n + 10_000_000 + i)), range(samples))
    t0 = time.perf_counter()
    keys = store.list()
    out["list_s"] = round(time.perf_counter() - t0, 4)
    t0 = time.perf_counter()
    infos = store.list_info()
    out["list_info_s"] = round(time.perf_counter() - t0, 4)
    out["listed"] = len(keys)
    assert len(infos) == n, (len(infos), n)
    # Each of these puts evicts the least recently used chunk. The budget's slack (see
    # above) holds a chunk or two more than n: those puts, untimed first, evict nothing
    # (2 of 50 timed "put + evict" samples on the memory tier did not evict).
    extra = 0
    ev0 = store.stats["evictions"]
    while store.stats["evictions"] == ev0 and extra < 16:
        store.put(key(n + 30_000_000 + extra), chunk)
        extra += 1
    ev0 = store.stats["evictions"]
    out["put_evicting_us"] = per_op_us(lambda i: store.put(key(n + i), chunk), range(min(samples, n)))
    out["evictions"] = store.stats["evictions"] - ev0
    store.close()
    if kind == "disk":
        t0 = time.perf_counter()
        reopened = open_store()
        out["restart_rebuild_s"] = round(time.perf_counter() - t0, 4)
        out["indexed_after_restart"] = len(reopened._index)  # type: ignore[attr-defined]  # the disk tier's in-memory index
        reopened.close()
        # Traced apart from the timing: tracemalloc slows every allocation several times.
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        reopened = open_store()
        out["rebuild_bytes_per_chunk"] = round((tracemalloc.get_traced_memory()[0] - base) / n)
        tracemalloc.stop()
        reopened.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--chunk-bytes", type=int, default=512, help="payload bytes per chunk (default 512)")
    ap.add_argument("--stores", default="memory,disk")
    ap.add_argument("--samples", type=int, default=1000, help="operations timed per measurement")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", default="bench_scale.json")
    args = ap.parse_args(argv)
    chunk = torch.randn(args.chunk_bytes // 2).to(torch.float16)
    root = tempfile.mkdtemp(prefix="lmcache-bench-scale-", dir=args.dir)
    rows = []
    try:
        for kind in args.stores.split(","):
            for n in (int(s) for s in args.sizes.split(",")):
                print(f"{kind}: {n} chunks ...", file=sys.stderr, flush=True)
                rows.append(measure(kind, n, chunk, root, args.samples))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cols = [
        ("store", "store"), ("chunks", "chunks"), ("put_fill_us", "put us"), ("contains_hit_us", "contains hit us"),
        ("contains_miss_us", "contains miss us"), ("put_evicting_us", "put+evict us"), ("list_s", "list s"),
        ("list_info_s", "list_info s"), ("restart_rebuild_s", "restart s"),
        ("bytes_per_indexed_chunk", "B/chunk held"),
    ]  # fmt: skip
    table = [[str(r.get(k, "-")) for k, _ in cols] for r in rows]
    widths = [max(len(t), *(len(row[i]) for row in table)) for i, (_, t) in enumerate(cols)]
    print("  ".join(t.ljust(w) for (_, t), w in zip(cols, widths, strict=True)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    with open(args.json, "w") as f:
        json.dump({"machine": machine_info(), "chunk_bytes": args.chunk_bytes, "rows": rows}, f, indent=2)
    print(f"JSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
