#!/usr/bin/env python3
"""Stress the disk tier from several processes and threads at once, then check it.

Every process opens the same directory with a small budget, so eviction runs
all the time, and its threads put, get, remove and list keys from one shared,
small key space: many writers of the same key, readers racing eviction and
removal in other processes. Every chunk is self-describing (its first two
elements are its slot and version; the rest follows from them), so a reader
can tell a valid chunk from a torn or mixed one without knowing who wrote it.

At the end (like diskcache's stress scripts) the store is reopened and checked:
every chunk file decodes with its checksum, no temp file is left, the budget
holds. Seedable; the test suite runs it briefly::

    python scripts/stress.py --procs 4 --threads 4 --seconds 60 --seed 3

Prints a JSON summary; exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the forkserver imports this module by name
    sys.path.insert(0, _HERE)

GB = 1024**3
ELEMENTS = 2 * 2 * 16 * 2 * 8  # fp32: 8 KiB per chunk


def key_for(slot: int) -> Any:
    from lmcache_core.key import CacheEngineKey

    return CacheEngineKey("vllm", "stress/model", 1, 0, hashlib.sha256(str(slot).encode()).hexdigest())


def value_for(slot: int, version: int) -> Any:
    """A chunk that names its own slot and version; the rest is derived from both."""
    import torch

    t = torch.arange(ELEMENTS, dtype=torch.float32) * (version % 97 + 1) + slot
    t[0], t[1] = float(slot), float(version)
    return t.reshape(2, 2, 16, 2, 8)


def is_valid(slot: int, got: Any) -> bool:
    """Whether ``got`` is exactly some version of ``slot``'s chunk (not torn, not another key's)."""
    import torch

    if got is None:
        return True
    flat = got.reshape(-1)
    if got.dtype != torch.float32 or flat.numel() != ELEMENTS or int(flat[0]) != slot:
        return False
    return bool(torch.equal(got.cpu(), value_for(slot, int(flat[1]))))


def open_store(root: str, budget_bytes: int) -> Any:
    from lmcache_core import LMCacheEngineConfig
    from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=root, max_local_disk_size=budget_bytes / GB
    )
    return LMCLocalDiskBackend(cfg, None, "cpu")


@dataclass
class Counts:
    """What the workers did and what went wrong."""

    puts: int = 0
    gets: int = 0
    hits: int = 0
    removes: int = 0
    lists: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: dict[str, Any]) -> None:
        for name in ("puts", "gets", "hits", "removes", "lists"):
            setattr(self, name, getattr(self, name) + other[name])
        self.errors += other["errors"]


def hammer(store: Any, slots: int, seconds: float, seed: int, counts: Counts, lock: threading.Lock) -> None:
    """One thread's random put/get/remove/list mix until ``seconds`` pass."""
    rng = random.Random(seed)
    local = Counts()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            slot = rng.randrange(slots)
            r = rng.random()
            if r < 0.40:
                store.put(key_for(slot), value_for(slot, rng.randrange(1 << 20)))
                local.puts += 1
            elif r < 0.85:
                got = store.get(key_for(slot))
                local.gets += 1
                local.hits += got is not None
                if not is_valid(slot, got):
                    local.errors.append(f"slot {slot}: torn or foreign chunk read")
            elif r < 0.97:
                store.remove(key_for(slot))
                local.removes += 1
            else:
                store.list()
                local.lists += 1
    except Exception:  # any exception is a failure of the store's contract
        local.errors.append(traceback.format_exc(limit=6))
    with lock:
        counts.add(asdict(local))


def run_threads(store: Any, threads: int, slots: int, seconds: float, seed: int) -> Counts:
    counts = Counts()
    lock = threading.Lock()
    workers = [
        threading.Thread(target=hammer, args=(store, slots, seconds, seed * 1000 + i, counts, lock))
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return counts


def process_main(conn: Connection, root: str, budget: int, threads: int, slots: int, seconds: float, seed: int) -> None:
    """One stress process: its own backend on the shared directory, several threads."""
    try:
        store = open_store(root, budget)
        counts = run_threads(store, threads, slots, seconds, seed)
        store.close()
    except Exception:
        counts = Counts(errors=[traceback.format_exc(limit=6)])
    conn.send_bytes(json.dumps(asdict(counts)).encode())


def check_store(root: str, budget: int) -> dict[str, Any]:
    """Reopen and audit: every chunk decodes with its checksum, no temp file, budget holds."""
    from lmcache_core import chunk_format
    from lmcache_core.errors import CorruptChunkError
    from lmcache_core.layout import TEMP_SUFFIX, scan_store

    store = open_store(root, budget)
    problems: list[str] = []
    verified = 0
    try:
        for path, _, key in scan_store(root):
            if path.endswith(TEMP_SUFFIX):
                problems.append(f"temp file left after a clean shutdown: {path}")
            if key is None:
                continue
            try:
                with open(path, "rb") as f:
                    t = chunk_format.decode(f.read(), key.to_string())
                verified += 1
            except CorruptChunkError as exc:
                problems.append(f"{path}: {exc}")
                continue
            slot = next((s for s in range(4096) if key_for(s) == key), None)
            if slot is None or not is_valid(slot, t):
                problems.append(f"{path}: decodes, but is not a valid chunk of its key")
        if store.used_bytes > budget:
            problems.append(f"budget exceeded after reopen: {store.used_bytes} > {budget}")
    finally:
        store.close()
    return {"chunks_verified": verified, "problems": problems}


def run(
    root: str, *, procs: int = 3, threads: int = 3, slots: int = 24, seconds: float = 2.0,
    seed: int = 0, budget: int = 16 * (ELEMENTS * 4 + 512),
) -> dict[str, Any]:
    """Run ``procs`` processes x ``threads`` threads on ``root``; returns the summary."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lmcache_core.storage_backend.local_backend", "stress"])
    from stress import process_main as entry  # the forkserver resolves it by this name

    total = Counts()
    children = []
    for p in range(procs):
        r, w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=entry, args=(w, root, budget, threads, slots, seconds, seed * 100 + p))
        proc.start()
        w.close()
        children.append((proc, r))
    for proc, r in children:
        try:
            total.add(json.loads(r.recv_bytes()))
        except EOFError:
            total.errors.append(f"process {proc.pid} died (exit code {proc.exitcode})")
        proc.join(timeout=seconds + 60)
    audit = check_store(root, budget)
    return {"procs": procs, "threads": threads, "seconds": seconds, "seed": seed, **asdict(total), **audit}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="store directory (default: a fresh temp dir)")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--slots", type=int, default=24, help="shared key space (small: many writers per key)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="lmcache-stress-")
    summary = run(root, procs=args.procs, threads=args.threads, slots=args.slots,
                  seconds=args.seconds, seed=args.seed)
    print(json.dumps({"dir": root, **summary}, indent=2))
    return 1 if summary["errors"] or summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
