#!/usr/bin/env python
"""GPU path check: correctness and H2D/D2H GB/s for ``dst_device="cuda"``.

Runs where a CUDA device exists (exits 2 with a message elsewhere). For the
memory tier on CPU with ``dst_device="cuda"`` (pinned slot pool) and the disk
tier (pinned read buffers), and for a memory tier on the GPU itself, it puts
chunks that live on the GPU, gets them back on the GPU and checks dtype, shape,
device and every byte; then it times the transfers beside raw
``copy_`` between pinned host memory and the device.

    python scripts/gpu_check.py [--count 8] [--shape 32,2,256,8,128] [--dtype bfloat16] [--json gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from lmcache_core.bench import REFERENCE_SHAPE, machine_info
from lmcache_core.config import LMCacheEngineConfig, LMCacheMemPoolMetadata
from lmcache_core.key import CacheEngineKey


def timed(fn: Callable[[], Any], nbytes: int, reps: int) -> dict[str, float]:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "gbps": round(nbytes * reps / sum(times) / 1e9, 3),
        "p50_ms": round(statistics.median(times) * 1e3, 3),
        "p99_ms": round(sorted(times)[min(len(times) - 1, int(0.99 * len(times)))] * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--shape", default=",".join(map(str, REFERENCE_SHAPE)))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default="gpu_check.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build: {torch.version.cuda}). Run this on a GPU machine.",
            file=sys.stderr,
        )
        return 2
    from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend

    shape = tuple(int(d) for d in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    nbytes = int(torch.tensor([], dtype=dtype).element_size() * torch.Size(shape).numel())
    gb = (args.count + 2) * nbytes / 1024**3
    chunks = [torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype) for _ in range(args.count)]
    keys = [CacheEngineKey("vllm", "gpu-check", 1, 0, f"{i:064x}") for i in range(args.count)]
    failures: list[str] = []
    results: dict[str, Any] = {"machine": machine_info(), "device": torch.cuda.get_device_name(), "tiers": {}}

    # Raw medium: pinned host <-> device copies of the same bytes.
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    results["raw"] = {
        "H2D copy_ (pinned)": timed(lambda: dev.copy_(host, non_blocking=True), nbytes, 20),
        "D2H copy_ (pinned)": timed(lambda: host.copy_(dev, non_blocking=True), nbytes, 20),
    }

    tmp = tempfile.mkdtemp(prefix="lmcache-gpu-check-")
    meta = LMCacheMemPoolMetadata(shape, dtype, gb)
    tiers = {
        "memory cpu -> cuda (pinned pool)": lambda: LMCLocalBackend(
            LMCacheEngineConfig.from_defaults(local_device="cpu", max_local_cache_size=gb), meta, "cuda"
        ),
        "memory on cuda": lambda: LMCLocalBackend(
            LMCacheEngineConfig.from_defaults(local_device="cuda", max_local_cache_size=gb), meta, "cuda"
        ),
        "disk -> cuda (pinned read buffers)": lambda: LMCLocalDiskBackend(
            LMCacheEngineConfig.from_defaults(local_device=None, local_disk=tmp, max_local_disk_size=4 * gb),
            meta,
            "cuda",
        ),
    }
    try:
        for name, make in tiers.items():
            store = make()
            try:
                def put_all(s: Any = store) -> None:
                    for k, c in zip(keys, chunks, strict=True):
                        s.put(k, c)

                def get_all(s: Any = store) -> None:
                    for k in keys:
                        s.get(k)

                put = timed(put_all, nbytes * args.count, 1)
                got_all = store.batched_get(keys)
                for k, c, got in zip(keys, chunks, got_all, strict=True):
                    if got is None:
                        failures.append(f"{name}: {k.chunk_hash[:8]} missing")
                    elif got.device.type != "cuda" or got.dtype != c.dtype or got.shape != c.shape:
                        failures.append(f"{name}: got {got.dtype} {tuple(got.shape)} on {got.device}")
                    elif not torch.equal(got.view(torch.uint8), c.view(torch.uint8)):
                        failures.append(f"{name}: bytes differ")
                del got_all
                get = timed(get_all, nbytes * args.count, 3)
                results["tiers"][name] = {"put (D2H into the tier)": put, "get (into cuda)": get}
            finally:
                store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results["failures"] = failures
    print(f"{results['device']}, chunks of {list(shape)} {args.dtype} ({nbytes / 2**20:.1f} MiB)")
    for op, r in results["raw"].items():
        print(f"  raw {op:<28} {r['gbps']:8.2f} GB/s  p50 {r['p50_ms']:.3f} ms")
    for name, ops in results["tiers"].items():
        for op, r in ops.items():
            print(f"  {name:<36} {op:<24} {r['gbps']:8.2f} GB/s  p50 {r['p50_ms']:.3f} ms")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    print("correctness:", "FAILED" if failures else "ok", f"(JSON: {args.json})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
