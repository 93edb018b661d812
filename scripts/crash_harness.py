#!/usr/bin/env python3
"""Crash harness for the disk tier: SIGKILL writers at random moments, then audit the store.

Each iteration starts ``--procs`` child processes that put, overwrite and remove
chunks in one shared store directory. Before each operation a child reports its
intent over a pipe, and after the backend returns it reports the acknowledgement.
The parent kills every child with SIGKILL at a random moment, reopens the store
(as a restarted server would) and checks:

* every acknowledged put reads back bytes-equal (dtype, shape, bytes); every
  acknowledged remove stays removed; the one operation in flight when the kill
  landed left either the old or the new state, nothing else;
* every chunk file in the store decodes and passes its checksum;
* no temp file survives the reopen (start-up cleanup of dead writers' files).

Seedable: the same ``--seed`` gives the same operation mix and kill schedule
(timing still varies, which is the point). The test suite runs a few
iterations; run it longer by hand::

    python scripts/crash_harness.py --iterations 2000 --procs 2 --seed 7 --json out.json

Prints one JSON summary; exit status 1 when anything was lost or torn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the forkserver imports this module by name
    sys.path.insert(0, _HERE)

MODEL = "crash/harness"
GB = 1024**3


def key_for(proc: int, slot: int) -> Any:
    """The CacheEngineKey of one slot of one child's key space."""
    from lmcache_core.key import CacheEngineKey

    digest = hashlib.sha256(f"{proc}:{slot}".encode()).hexdigest()
    return CacheEngineKey("vllm", MODEL, 1, 0, digest)


def value_for(version: int) -> Any:
    """The chunk written for ``version``: its shape and bytes both depend on it."""
    import torch

    rng = random.Random(version)
    tokens = rng.choice((1, 8, 64, 256))  # 2 KiB to 512 KiB: kills land mid-write
    g = torch.Generator().manual_seed(version)
    return torch.randn((2, 2, tokens, 4, 64), generator=g).to(torch.float16)


def open_store(root: str, budget_gb: float, fsync: bool) -> Any:
    from lmcache_core import LMCacheEngineConfig
    from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=root, max_local_disk_size=budget_gb
    )
    return LMCLocalDiskBackend(cfg, None, "cpu", fsync=fsync)


def child_main(
    conn: Connection, root: str, proc: int, seed: int, iteration: int, slots: int,
    budget_gb: float, fsync: bool,
) -> None:
    """A writer: random puts/overwrites/removes until killed; intent and ack over ``conn``."""
    store = open_store(root, budget_gb, fsync)
    conn.send_bytes(b"ready")
    rng = random.Random(f"{seed}:{iteration}:{proc}")
    n = 0
    while True:
        slot = rng.randrange(slots)
        version = (iteration * 1_000_003 + n) * 64 + proc + 1
        n += 1
        if rng.random() < 0.2:
            conn.send_bytes(f"B {slot} -".encode())
            store.remove(key_for(proc, slot))
        else:
            conn.send_bytes(f"B {slot} {version}".encode())
            store.put(key_for(proc, slot), value_for(version))
        conn.send_bytes(b"A")


@dataclass
class Summary:
    """Figures of one harness run (printed as JSON)."""

    seed: int
    iterations: int = 0
    kills: int = 0
    killed_before_ready: int = 0
    acked_ops: int = 0
    acked_puts: int = 0
    acked_removes: int = 0
    acked_puts_checked: int = 0  # reads of acknowledged puts that came back bytes-equal
    removes_checked: int = 0  # reads of acknowledged removes that stayed a miss
    inflight_resolved_old: int = 0
    inflight_resolved_new: int = 0
    chunk_files_verified: int = 0
    stale_temps_removed: int = 0
    evicted_misses: int = 0
    cli_verifies: int = 0  # `lmcache verify --fix` runs on a just-killed store, all clean
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


class _ChildState:
    """What the parent knows of one child's key space: slot -> version (None: removed)."""

    def __init__(self) -> None:
        self.model: dict[int, int | None] = {}
        self.pending: tuple[int, int | None] | None = None

    def feed(self, msg: bytes, summary: Summary) -> None:
        if msg == b"ready":
            return
        if msg == b"A":
            assert self.pending is not None, "ack without intent"
            slot, version = self.pending
            self.model[slot] = version
            self.pending = None
            summary.acked_ops += 1
            if version is None:
                summary.acked_removes += 1
            else:
                summary.acked_puts += 1
            return
        _, slot_text, version_text = msg.decode().split()
        self.pending = (int(slot_text), None if version_text == "-" else int(version_text))


def _same(a: Any, b: Any) -> bool:
    import torch

    if a is None or a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def audit(root: str, states: list[_ChildState], summary: Summary, budget_gb: float, evicts: bool) -> None:
    """Reopen the store and check every promise; failures go to ``summary.failures``."""
    from lmcache_core import chunk_format
    from lmcache_core.errors import CorruptChunkError
    from lmcache_core.layout import TEMP_SUFFIX, scan_store

    store = open_store(root, budget_gb, fsync=False)
    summary.stale_temps_removed += store.stale_temps_removed
    it = summary.iterations
    try:
        temps = [p for p, _, _ in scan_store(root) if p.endswith(TEMP_SUFFIX)]
        if temps:
            summary.failures.append(f"iteration {it}: {len(temps)} temp files survived reopen: {temps[:3]}")
        for proc, state in enumerate(states):
            slots = set(state.model) | ({state.pending[0]} if state.pending else set())
            for slot in slots:
                got = store.get(key_for(proc, slot))
                acked = state.model.get(slot)
                allowed: list[int | None] = [acked]
                if state.pending and state.pending[0] == slot:
                    allowed.append(state.pending[1])
                ok, matched = False, None
                for version in allowed:
                    if version is None and got is None:
                        ok, matched = True, version
                    elif version is not None and got is not None and _same(got, value_for(version)):
                        ok, matched = True, version
                    if ok:
                        break
                if not ok and evicts and got is None:
                    summary.evicted_misses += 1  # a cache may drop what it acknowledged
                    continue
                if not ok:
                    desc = "a miss" if got is None else f"wrong bytes {tuple(got.shape)}"
                    summary.failures.append(
                        f"iteration {it}: proc {proc} slot {slot}: got {desc}, allowed versions {allowed}"
                    )
                    continue
                if len(allowed) == 2 and allowed[0] != allowed[1]:
                    if matched == allowed[0]:
                        summary.inflight_resolved_old += 1
                    else:
                        summary.inflight_resolved_new += 1
                elif acked is None:
                    summary.removes_checked += 1
                else:
                    summary.acked_puts_checked += 1
        for path, _, key in scan_store(root):
            if key is None:
                continue
            try:
                with open(path, "rb") as f:
                    chunk_format.decode(f.read(), key.to_string())
                summary.chunk_files_verified += 1
            except CorruptChunkError as exc:
                summary.failures.append(f"iteration {it}: {path} fails verification: {exc}")
            except FileNotFoundError:
                pass
    finally:
        store.close()


def run(
    root: str,
    *,
    iterations: int = 10,
    procs: int = 1,
    seed: int = 0,
    slots: int = 48,
    max_delay: float = 0.3,
    fsync: bool = False,
    budget_gb: float = 1.0,
    evicts: bool = False,
    cli_verify_every: int = 0,
    progress_every: int = 0,
) -> Summary:
    """Run the harness on ``root``; returns the figures (``failures`` empty when all held)."""
    ctx = multiprocessing.get_context("forkserver")
    # Children fork from a server that has torch imported: a kill cycle costs ms, not seconds.
    ctx.set_forkserver_preload(["torch", "lmcache_core.storage_backend.local_backend", "crash_harness"])
    from crash_harness import child_main as entry  # the forkserver resolves it by this name

    rng = random.Random(seed)
    states = [_ChildState() for _ in range(procs)]
    summary = Summary(seed=seed)
    start = time.monotonic()
    for it in range(iterations):
        summary.iterations = it
        children = []
        for proc in range(procs):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=entry, args=(w, root, proc, seed, it, slots, budget_gb, fsync), daemon=True
            )
            p.start()
            w.close()
            children.append((p, r))
        # Kill each child at its own random moment; one in ten before it is even ready,
        # so start-up (index rebuild, temp cleanup) is killed too.
        early = rng.random() < 0.1
        deadline = time.monotonic() + 30.0
        if not early:
            for _, r in children:
                if not r.poll(max(0.0, deadline - time.monotonic())):
                    summary.failures.append(f"iteration {it}: a child never became ready")
        else:
            summary.killed_before_ready += 1
        for p, _ in children:
            time.sleep(rng.uniform(0.0, max_delay) / procs)
            assert p.pid is not None  # started above
            os.kill(p.pid, signal.SIGKILL)
            summary.kills += 1
        for (p, r), state in zip(children, states, strict=True):
            p.join()
            while True:
                try:
                    state.feed(r.recv_bytes(), summary)
                except (EOFError, OSError):
                    break
            r.close()
        if cli_verify_every and (it + 1) % cli_verify_every == 0:
            cli_verify(root, summary)  # on the torn state, before anything else reopens it
        audit(root, states, summary, budget_gb, evicts)
        if progress_every and (it + 1) % progress_every == 0:
            print(f"iteration {it + 1}: {summary.acked_ops} acked ops, "
                  f"{len(summary.failures)} failures", file=sys.stderr, flush=True)
        for proc, state in enumerate(states):  # the audit settled the in-flight op: record it
            if state.pending is not None:
                state.model[state.pending[0]] = _on_disk_version(root, state, proc, budget_gb)
                state.pending = None
        if summary.failures:
            break
    summary.iterations = it + 1 if iterations else 0
    summary.seconds = round(time.monotonic() - start, 2)
    return summary


def cli_verify(root: str, summary: Summary) -> None:
    """Run ``lmcache verify --fix`` on the store as an operator would after a crash."""
    import subprocess

    cmd = [sys.executable, "-c", "from lmcache_cli.main import main; main()",
           "--store", root, "--format", "json", "verify", "--fix"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    it = summary.iterations
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        summary.failures.append(f"iteration {it}: verify printed no JSON (exit {proc.returncode}): "
                                f"{proc.stderr.strip()[-300:]}")
        return
    if proc.returncode != 0 or report.get("bad") or report.get("problems_left"):
        summary.failures.append(f"iteration {it}: verify --fix found torn chunks: {report}")
        return
    summary.cli_verifies += 1


def _on_disk_version(root: str, state: _ChildState, proc: int, budget_gb: float) -> int | None:
    """Which of the in-flight op's two outcomes the store holds (after a clean audit)."""
    assert state.pending is not None
    slot, new = state.pending
    store = open_store(root, budget_gb, fsync=False)
    try:
        got = store.get(key_for(proc, slot))
    finally:
        store.close()
    if got is None:
        return None
    if new is not None and _same(got, value_for(new)):
        return new
    return state.model.get(slot)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="store directory (default: a fresh temp dir)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--procs", type=int, default=1, help="writer processes sharing the store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=48, help="keys per writer")
    ap.add_argument("--max-delay", type=float, default=0.3, help="longest a child runs, seconds")
    ap.add_argument("--fsync", action="store_true", help="fsync every chunk before rename")
    ap.add_argument("--evict", action="store_true", help="small budget: acked chunks may be evicted")
    ap.add_argument("--cli-verify-every", type=int, default=0,
                    help="every N kills, run `lmcache verify --fix` on the torn store first")
    ap.add_argument("--progress-every", type=int, default=100, help="print progress every N iterations")
    ap.add_argument("--json", help="also write the summary to this file")
    args = ap.parse_args(argv)
    import tempfile

    root = args.dir or tempfile.mkdtemp(prefix="lmcache-crash-")
    budget = 8 * 1024**2 / GB if args.evict else 1.0
    summary = run(
        root, iterations=args.iterations, procs=args.procs, seed=args.seed, slots=args.slots,
        max_delay=args.max_delay, fsync=args.fsync, budget_gb=budget, evicts=args.evict,
        cli_verify_every=args.cli_verify_every, progress_every=args.progress_every,
    )
    out = json.dumps({"dir": root, **asdict(summary)}, indent=2)
    print(out)
    if args.json:
        Path(args.json).write_text(out + "\n")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
