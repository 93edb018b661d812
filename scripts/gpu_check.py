#!/usr/bin/env python
"""GPU path check: correctness and H2D/D2H GB/s for ``dst_device="cuda"``.

Runs where a CUDA device exists (exits 2 with a message elsewhere). For the
memory tier on CPU with ``dst_device="cuda"`` (pinned slot pool), the disk tier
(pinned read buffers), a memory tier on the GPU itself and a memory+disk hybrid,
it puts chunks that live on the GPU, gets them back and checks dtype, shape,
device (the configuring thread's GPU, also for gets on the library's threads)
and every byte; also after eviction reuses slots, for non-blocking puts, and
for a caller working on a side CUDA stream (chunks made there just before the put).
Then it times each put and get beside raw ``copy_`` between pinned host memory
and the device, one operation per sample (p50/p99 over all of them).

    python scripts/gpu_check.py [--count 8] [--shape 32,2,256,8,128] [--dtype bfloat16] [--json gpu_check.json]

``--device cpu`` runs the same checks with CPU tensors (no transfer figures): how
CI exercises this script without a GPU.
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
from lmcache_core.storage_backend import LMCBackendInterface
from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[int], Any], count: int, nbytes: int, reps: int, device: torch.device) -> dict[str, float]:
    """``fn(i)`` for i in range(count), ``reps`` times after one warm-up round; one sample per call."""
    for i in range(count):
        fn(i)
    times = []
    for _ in range(reps):
        for i in range(count):
            _sync(device)
            t0 = time.perf_counter()
            fn(i)
            _sync(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {  # four significant digits: tiny self-test chunks must not round to 0 GB/s
        "gbps": float(f"{nbytes * len(times) / sum(times) / 1e9:.4g}"),
        "p50_ms": float(f"{statistics.median(times) * 1e3:.4g}"),
        "p99_ms": float(f"{times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3:.4g}"),
        "samples": len(times),
    }


class Checker:
    """Collects correctness failures, one line each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.failures: list[str] = []

    def same(self, where: str, got: torch.Tensor | None, want: torch.Tensor) -> None:
        if got is None:
            self.failures.append(f"{where}: missing")
        elif got.device != self.device or got.dtype != want.dtype or got.shape != want.shape:
            self.failures.append(
                f"{where}: got {got.dtype} {tuple(got.shape)} on {got.device}, "
                f"want {want.dtype} {tuple(want.shape)} on {self.device}"
            )
        elif not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            self.failures.append(f"{where}: bytes differ")

    def true(self, where: str, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(f"{where}: {what}")


def check_tier(
    name: str,
    store: LMCBackendInterface,
    keys: list[CacheEngineKey],
    chunks: list[torch.Tensor],
    check: Checker,
) -> None:
    """Round trips: blocking puts, gets (also batched, so on the library's reader threads)."""
    for k, c in zip(keys, chunks, strict=True):
        store.put(k, c)
    for i, (k, c) in enumerate(zip(keys, chunks, strict=True)):
        check.same(f"{name} get {i}", store.get(k), c)
    for i, (got, c) in enumerate(zip(store.batched_get(keys), chunks, strict=True)):
        check.same(f"{name} batched_get {i}", got, c)


def check_reuse_and_nonblocking(
    name: str,
    make: Callable[[float], LMCBackendInterface],
    nbytes: int,
    keys: list[CacheEngineKey],
    chunks: list[torch.Tensor],
    check: Checker,
) -> None:
    """In a two-chunk budget, later puts evict and reuse slots; non-blocking puts read back at once."""
    store = make(2 * nbytes / 1024**3)
    try:
        for i, (k, c) in enumerate(zip(keys, chunks, strict=True)):
            store.put(k, c, blocking=False)
            check.same(f"{name} non-blocking put {i}, read back at once", store.get(k), c)
    finally:
        store.close()
    store = make(2 * nbytes / 1024**3)
    try:
        for i, (k, c) in enumerate(zip(keys, chunks, strict=True)):
            store.put(k, c)
            check.same(f"{name} put {i} into a full store", store.get(k), c)
        check.true(f"{name} eviction", store.get(keys[0]) is None, "the first chunk outlived a 2-chunk budget")
    finally:
        store.close()


def check_side_stream(
    name: str,
    make: Callable[[], LMCBackendInterface],
    keys: list[CacheEngineKey],
    chunks: list[torch.Tensor],
    check: Checker,
    device: torch.device,
) -> None:
    """A caller on a side stream, as LMCache's loads and stores are: each chunk is made
    there behind a GPU sleep and put at once (blocking and not, in turn), then read back,
    also with ``batched_get`` from that stream. The library's threads work on the default
    stream: one that read a chunk without waiting for the caller's stream would store the
    zeros from before the copy, under a valid checksum."""
    if device.type != "cuda":
        return
    side = torch.cuda.Stream(device)
    store = make()
    made: list[torch.Tensor] = []
    try:
        with torch.cuda.stream(side):
            for i, (k, c) in enumerate(zip(keys, chunks, strict=True)):
                out = torch.zeros_like(c)
                torch.cuda._sleep(20_000_000)  # some milliseconds of GPU time before the copy
                out.copy_(c)
                made.append(out)  # alive until stored: the caller's promise for non-blocking puts
                store.put(k, out, blocking=i % 2 == 0)
            side.synchronize()
            for i, (k, c) in enumerate(zip(keys, chunks, strict=True)):
                check.same(f"{name} side-stream put {i}", store.get(k), c)
            got = store.batched_get(keys)
            side.synchronize()
        for i, (g, c) in enumerate(zip(got, chunks, strict=True)):
            check.same(f"{name} side-stream batched_get {i}", g, c)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--shape", default=",".join(map(str, REFERENCE_SHAPE)))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds of --count operations each")
    ap.add_argument("--json", default="gpu_check.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build: {torch.version.cuda}). Run this on a GPU machine.",
            file=sys.stderr,
        )
        return 2
    on_gpu = args.device == "cuda"
    if on_gpu and torch.cuda.device_count() > 1:
        # Not GPU 0: a library thread that dropped the index would land on GPU 0 and fail the checks.
        torch.cuda.set_device(torch.cuda.device_count() - 1)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    shape = tuple(int(d) for d in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    nbytes = int(torch.tensor([], dtype=dtype).element_size() * torch.Size(shape).numel())
    gb = (args.count + 2) * nbytes / 1024**3
    chunks = [torch.randn(shape, device=device, dtype=torch.float32).to(dtype) for _ in range(args.count)]
    keys = [CacheEngineKey("vllm", "gpu-check", 1, 0, f"{i:064x}") for i in range(args.count)]
    check = Checker(device)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (script self-test)",
        "chunk": {"shape": list(shape), "dtype": args.dtype, "bytes": nbytes},
        "tiers": {},
    }

    if on_gpu:  # the raw medium: pinned host <-> device copies of the same bytes
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        results["raw"] = {
            "H2D copy_ (pinned)": timed(lambda i: dev.copy_(host, non_blocking=True), 1, nbytes, 20, device),
            "D2H copy_ (pinned)": timed(lambda i: host.copy_(dev, non_blocking=True), 1, nbytes, 20, device),
        }

    tmp = tempfile.mkdtemp(prefix="lmcache-gpu-check-")
    dst = args.device
    mem_dev = "cuda" if on_gpu else "cpu"

    def memory_cpu(budget_gb: float = gb) -> LMCBackendInterface:
        cfg = LMCacheEngineConfig.from_defaults(local_device="cpu", max_local_cache_size=budget_gb)
        return LMCLocalBackend(cfg, LMCacheMemPoolMetadata(shape, dtype, budget_gb), dst)

    def memory_gpu(budget_gb: float = gb) -> LMCBackendInterface:
        cfg = LMCacheEngineConfig.from_defaults(local_device=mem_dev, max_local_cache_size=budget_gb)
        return LMCLocalBackend(cfg, LMCacheMemPoolMetadata(shape, dtype, budget_gb), dst)

    def disk(budget_gb: float = 4 * gb, sub: str = "disk") -> LMCBackendInterface:
        cfg = LMCacheEngineConfig.from_defaults(
            local_device=None, local_disk=f"{tmp}/{sub}-{budget_gb:.6f}", max_local_disk_size=budget_gb
        )
        return LMCLocalDiskBackend(cfg, LMCacheMemPoolMetadata(shape, dtype, budget_gb), dst)

    def hybrid(budget_gb: float = gb) -> LMCBackendInterface:
        cfg = LMCacheEngineConfig.from_defaults(
            local_device="cpu",
            max_local_cache_size=budget_gb,
            local_disk=f"{tmp}/hybrid-{budget_gb:.6f}",
            max_local_disk_size=4 * budget_gb,
        )
        return LMCHybridBackend(cfg, None, LMCacheMemPoolMetadata(shape, dtype, budget_gb), dst)

    def hybrid_gpu(budget_gb: float = gb) -> LMCBackendInterface:
        cfg = LMCacheEngineConfig.from_defaults(
            local_device=mem_dev,
            max_local_cache_size=budget_gb,
            local_disk=f"{tmp}/hybrid-gpu-{budget_gb:.6f}",
            max_local_disk_size=4 * budget_gb,
        )
        return LMCHybridBackend(cfg, None, LMCacheMemPoolMetadata(shape, dtype, budget_gb), dst)

    tiers: dict[str, Callable[..., LMCBackendInterface]] = {
        "memory cpu -> cuda (pinned pool)": memory_cpu,
        "memory on cuda (get: zero-copy)": memory_gpu,
        "disk -> cuda (pinned read buffers)": disk,
        "hybrid memory+disk -> cuda": hybrid,
        "hybrid memory on cuda+disk": hybrid_gpu,
    }
    try:
        for name, make in tiers.items():
            store = make()
            try:
                check_tier(name, store, keys, chunks, check)
                pool = getattr(store, "_pool", None)
                if on_gpu and pool is not None and pool.device.type == "cpu":
                    # Otherwise the "(pinned ...)" figures below would be pageable-memory ones.
                    check.true(name, pool.pin_memory, "its host buffers are not pinned")
                    if isinstance(store, LMCLocalBackend):
                        stored = store.peek(keys[0])
                        check.true(name, stored is not None and stored.is_pinned(), "a stored slot is not pinned")
                if "zero-copy" in name and isinstance(store, LMCLocalBackend):
                    got, stored = store.get(keys[0]), store.peek(keys[0])
                    check.true(
                        name,
                        got is not None and stored is not None and got.data_ptr() == stored.data_ptr(),
                        "get copied the chunk",
                    )
                def put_one(i: int, s: LMCBackendInterface = store) -> None:
                    s.put(keys[i], chunks[i])

                def get_one(i: int, s: LMCBackendInterface = store) -> None:
                    s.get(keys[i])

                put = timed(put_one, args.count, nbytes, args.reps, device)
                get = timed(get_one, args.count, nbytes, args.reps, device)
                results["tiers"][name] = {"put (from cuda)": put, "get (onto cuda)": get}
            finally:
                store.close()
        for name, make in (("memory cpu", memory_cpu), ("memory on cuda", memory_gpu), ("disk", disk)):
            check_reuse_and_nonblocking(name, make, nbytes, keys, chunks, check)
        # Empty directories: a put that stored nothing must not be masked by an earlier copy.
        shutil.rmtree(tmp)
        for name, make in tiers.items():
            check_side_stream(name, make, keys, chunks, check, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results["failures"] = check.failures
    print(f"{results['device']}, chunks of {list(shape)} {args.dtype} ({nbytes / 2**20:.1f} MiB)")
    for op, r in results.get("raw", {}).items():
        print(f"  raw {op:<28} {r['gbps']:8.2f} GB/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    for name, ops in results["tiers"].items():
        for op, r in ops.items():
            print(f"  {name:<36} {op:<16} {r['gbps']:8.2f} GB/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    for f in check.failures:
        print(f"FAIL {f}", file=sys.stderr)
    with open(args.json, "w") as fh:
        json.dump(results, fh, indent=2)
    print("correctness:", "FAILED" if check.failures else "ok", f"(JSON: {args.json})")
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
