"""Audit 7 of the disk tier (``LMCLocalDiskBackend``): a full disk, and processes sharing a directory.

* A write refused for a full disk (``ENOSPC``/``EDQUOT``) failed every put for good when
  the budget was larger than the room the filesystem had, while the tier sat on chunks
  it could let go: now the tier removes dead writers' temp files and its least recently
  used chunks (never the key being written) and tries again, ``FULL_DISK_RETRIES`` times
  at most, before ``StoreFullError``.
* Several real processes on one directory (puts, gets, removes, restarts, the CLI, a
  writer killed mid-write): what each promises.
* Regression: removing a corrupt chunk deleted the good chunk another process had
  written over it after the check.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, chunk_format
from lmcache_core.errors import StoreFullError
from lmcache_core.key import CacheEngineKey
from lmcache_core.layout import TEMP_SUFFIX, key_to_path
from lmcache_core.storage_backend import disk_io
from lmcache_core.storage_backend.local_backend import FULL_DISK_RETRIES, LMCLocalDiskBackend
from tests.conftest import make_key

GB = 1024**3
KiB = 1024
REPO = Path(__file__).resolve().parent.parent
LMCACHE = str(Path(sys.executable).with_name("lmcache"))
SHAPE = (2, 2, 16, 4, 32)  # 16 KiB of fp16 per chunk


def open_disk(root: Path | str, budget_bytes: int | None = None, **kw: Any) -> LMCLocalDiskBackend:
    size = 1.0 if budget_bytes is None else budget_bytes / GB
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(root), max_local_disk_size=size)
    return LMCLocalDiskBackend(cfg, None, "cpu", **kw)


def chunk(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).half()


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def chunk_files(root: Path) -> list[Path]:
    return list(root.rglob("*.safetensors"))


def all_chunks_valid(root: Path) -> int:
    """Decode every chunk file under ``root`` with its checksum; how many there are."""
    for p in chunk_files(root):
        chunk_format.decode(p.read_bytes())  # CorruptChunkError on a torn file
    return len(chunk_files(root))


def run_python(body: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``body`` in a fresh interpreter (this module importable), checked."""
    code = "from tests.test_disk_audit7 import *\n" + body
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, timeout=timeout, capture_output=True, text=True
    )


def filled(store: LMCLocalDiskBackend, n: int, base: int = 0) -> list[CacheEngineKey]:
    """Put ``n`` chunks (the first is the least recently used); their keys."""
    keys = [make_key(f"c{base + i}") for i in range(n)]
    for i, key in enumerate(keys):
        store.put(key, chunk(base + i))
    return keys


# -- 1. a full disk frees room from the tier's own chunks ----------------------------------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_on_the_first_write_evicts_the_oldest_chunk_and_the_put_lands(tmp_path, blocking, err):
    root = tmp_path / "store"
    store = open_disk(root)
    keys = filled(store, 4)
    fault = disk_io.Fault("write", err, times=1)
    with disk_io.fault_hook(fault):
        store.put(make_key("new"), chunk(99), blocking=blocking)
        got = store.get(make_key("new"))
    assert got is not None and torch.equal(got, chunk(99))
    assert fault.failures == 1
    # One chunk's worth went, the least recently used one; the rest are whole.
    assert store.get(keys[0]) is None and not (root / key_to_path(keys[0])).exists()
    for i, key in enumerate(keys[1:], 1):
        assert torch.equal(store.get(key), chunk(i))
    assert store.stats["full_disk_retries"] == 1 and store.stats["full_disk_evictions"] == 1
    assert store.stats["put_failures"] == 0 and store.stats["background_put_failures"] == 0
    assert temp_files(root) == []  # the failed try's half-written temp file is gone
    assert store.used_bytes == sum(p.stat().st_size for p in chunk_files(root))
    store.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
def test_a_full_disk_never_evicts_the_key_being_written(tmp_path, blocking):
    """The key being overwritten is the least recently used: the next one goes instead,
    and the newer chunk of the key lands."""
    root = tmp_path / "store"
    store = open_disk(root)
    keys = filled(store, 3)
    with disk_io.fault_hook(disk_io.Fault("write", errno.ENOSPC, times=1)):
        store.put(keys[0], chunk(50), blocking=blocking)
        assert torch.equal(store.get(keys[0]), chunk(50))
    assert store.get(keys[1]) is None
    assert torch.equal(store.get(keys[2]), chunk(2))
    assert store.stats["full_disk_evictions"] == 1
    store.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
@pytest.mark.parametrize("op", ["open", "write", "fsync", "replace"])
def test_a_disk_that_stays_full_is_a_store_full_error_after_bounded_tries(tmp_path, blocking, op):
    root = tmp_path / "store"
    store = open_disk(root, fsync=True)
    keys = filled(store, 6)
    fault = disk_io.Fault(op, errno.ENOSPC, path_contains=TEMP_SUFFIX if op == "open" else "")  # not a get's open
    with disk_io.fault_hook(fault):
        if blocking:
            with pytest.raises(StoreFullError) as info:
                store.put(keys[0], chunk(60))  # an overwrite of the oldest chunk
            assert info.value.errno == errno.ENOSPC
        else:
            store.put(keys[0], chunk(60), blocking=False)
            store.get(keys[0])  # waits for the queued write
    assert fault.failures == 1 + FULL_DISK_RETRIES  # tried, then retried a bounded number of times
    assert store.stats["full_disk_retries"] == FULL_DISK_RETRIES
    assert store.stats["put_failures"] == 1
    assert store.stats["background_put_failures"] == (0 if blocking else 1)
    # Nothing half-written; one chunk went per retry. The older chunk of the key is
    # intact after a blocking put (its caller was told), removed after a queued one
    # (acknowledged as queued, it replaced that chunk: test_hybrid_nonblocking_disk.py).
    assert temp_files(root) == []
    if blocking:
        assert torch.equal(store.get(keys[0]), chunk(0))
    else:
        assert store.get(keys[0]) is None and store.stats["failed_put_forgotten"] == 1
    gone = [k for k in keys[1:] if store.get(k) is None]
    assert gone == keys[1 : 1 + FULL_DISK_RETRIES]
    for i in range(1 + FULL_DISK_RETRIES, 6):
        assert torch.equal(store.get(keys[i]), chunk(i))
    assert all_chunks_valid(root) == 6 - FULL_DISK_RETRIES - (0 if blocking else 1)
    # Space returns: the same put works.
    store.put(keys[0], chunk(60), blocking=blocking)
    assert torch.equal(store.get(keys[0]), chunk(60))
    store.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
def test_a_full_disk_with_nothing_to_evict_is_a_store_full_error_at_once(tmp_path, blocking):
    """The tier holds only the key being written: no retry; the older chunk intact after
    a blocking put, removed after a queued one."""
    root = tmp_path / "store"
    store = open_disk(root)
    key = make_key("only")
    store.put(key, chunk(1))
    fault = disk_io.Fault("write", errno.ENOSPC)
    with disk_io.fault_hook(fault):
        if blocking:
            with pytest.raises(StoreFullError):
                store.put(key, chunk(2))
            assert torch.equal(store.get(key), chunk(1))  # intact: the caller was told
        else:
            store.put(key, chunk(2), blocking=False)
            assert store.get(key) is None  # acknowledged as queued, it replaced that chunk
        if blocking:  # evicts the only chunk, retries, then has nothing left to evict
            with pytest.raises(StoreFullError):
                store.put(make_key("other"), chunk(3))
        else:
            store.put(make_key("other"), chunk(3), blocking=False)
        assert store.get(make_key("other")) is None
    # One try for the overwrite; for the other key two (one eviction), or one when the
    # failed queued overwrite took the only chunk with it.
    assert fault.failures == 1 + (2 if blocking else 1)
    assert store.stats["full_disk_retries"] == (1 if blocking else 0)
    assert store.stats["put_failures"] == 2
    assert store.stats["background_put_failures"] == (0 if blocking else 2)
    assert temp_files(root) == [] and chunk_files(root) == []
    assert store.used_bytes == 0
    store.close()


def test_a_disk_that_stays_full_does_not_drain_the_tier(tmp_path):
    """Each put that letting go did not save took two chunks with it: a disk filled by
    others (or snapshots, or a quota on other files) emptied the tier, put by put,
    and every put still failed. After one such put, none is let go for a while."""
    root = tmp_path / "store"
    store = open_disk(root)
    keys = filled(store, 10)
    with disk_io.fault_hook(disk_io.Fault("write", errno.ENOSPC)):
        for i in range(5):
            with pytest.raises(StoreFullError):
                store.put(make_key(f"stays-full-{i}"), chunk(50 + i))
    assert store.stats["full_disk_evictions"] == FULL_DISK_RETRIES  # the first put's, no more
    held = [k for k in keys if store.contains(k)]
    assert held == keys[FULL_DISK_RETRIES:]
    # The disk takes a write again: the backoff ends, and a full disk lets go once more.
    store.put(make_key("space-again"), chunk(70))
    with disk_io.fault_hook(disk_io.Fault("write", errno.ENOSPC, times=1)):
        store.put(make_key("full-once"), chunk(71))
    assert torch.equal(store.get(make_key("full-once")), chunk(71))
    assert store.stats["full_disk_evictions"] == FULL_DISK_RETRIES + 1
    store.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
def test_a_store_with_no_budget_never_evicts_for_a_full_disk(tmp_path, blocking):
    """The tools' stores (``store_ops.Store``: no budget) promise never to evict: a full
    disk fails their write and every chunk stays."""
    from lmcache_core.store_ops import UNLIMITED_GB

    root = tmp_path / "store"
    store = open_disk(root, budget_bytes=int(UNLIMITED_GB * GB))
    keys = filled(store, 4)
    fault = disk_io.Fault("write", errno.ENOSPC)
    with disk_io.fault_hook(fault):
        if blocking:
            with pytest.raises(StoreFullError):
                store.put(make_key("new"), chunk(9))
        else:
            store.put(make_key("new"), chunk(9), blocking=False)
        assert store.get(make_key("new")) is None
    assert fault.failures == 1 and store.stats["full_disk_retries"] == 0
    for i, key in enumerate(keys):
        assert torch.equal(store.get(key), chunk(i))
    assert temp_files(root) == [] and len(chunk_files(root)) == 4
    store.close()


def test_the_tools_store_fails_a_write_to_a_full_disk_and_evicts_nothing(tmp_path):
    """``store_ops.Store`` (what every ``lmcache`` command opens) on a full disk."""
    from lmcache_core.store_ops import Store

    root = tmp_path / "store"
    writer = open_disk(root)
    keys = filled(writer, 4)
    writer.close()
    store = Store(str(root), LMCacheEngineConfig.from_defaults(max_local_disk_size=1.0))
    try:
        with disk_io.fault_hook(disk_io.Fault("write", errno.ENOSPC)):
            with pytest.raises(StoreFullError):
                store.backend.put(make_key("new"), chunk(9))
        for i, key in enumerate(keys):
            assert torch.equal(store.backend.get(key), chunk(i))
        assert temp_files(root) == [] and len(chunk_files(root)) == 4
    finally:
        store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (root, where mounting is permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected-fault tests above cover the logic")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_keeps_taking_puts_under_a_larger_budget(small_disk):
    """A 1 GB budget on a 1 MiB filesystem: 40 chunks of 64 KiB all land, the newest
    readable, the oldest evicted; before, every put failed once the disk filled."""
    root = small_disk / "store"
    store = open_disk(root)
    big = (2, 2, 64, 4, 32)
    for i in range(40):
        store.put(make_key(i), chunk(i, big))
        assert torch.equal(store.get(make_key(i)), chunk(i, big))
    assert store.stats["full_disk_evictions"] > 0 and store.stats["put_failures"] == 0
    assert store.get(make_key(0)) is None
    assert temp_files(root) == []
    n = all_chunks_valid(root)
    assert 3 <= n < 40 and store.used_bytes == sum(p.stat().st_size for p in chunk_files(root))
    store.close()


def test_threads_racing_on_a_really_full_disk_never_tear_and_keep_the_index_true(small_disk):
    """4 writers and 2 readers on a full 1 MiB tmpfs: a put lands or is a StoreFullError
    (others may take the room freed for it), a read is a whole chunk or a miss."""
    root = small_disk / "store"
    store = open_disk(root)
    big = (2, 2, 64, 4, 32)
    errors: list[str] = []
    full = [0]
    stop = threading.Event()

    def writer(w: int) -> None:
        for i in range(30):
            try:
                store.put(make_key(f"{w}-{i}"), chunk(w * 100 + i, big), blocking=i % 2 == 0)
            except StoreFullError:
                full[0] += 1
            except Exception as exc:  # noqa: BLE001 - any other exception breaks the contract
                errors.append(f"writer {w}: {exc!r}")

    def reader(r: int) -> None:
        while not stop.is_set():
            for w in range(4):
                for i in range(30):
                    got = store.get(make_key(f"{w}-{i}"))
                    if got is not None and not torch.equal(got, chunk(w * 100 + i, big)):
                        errors.append(f"reader {r}: wrong chunk for {w}-{i}")

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    readers = [threading.Thread(target=reader, args=(r,)) for r in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    stop.set()
    for t in readers:
        t.join(timeout=120)
    store.close()
    assert errors == []
    assert store.stats["full_disk_evictions"] > 0
    assert store.stats["puts"] + store.stats["put_failures"] + store.stats["superseded_puts"] == 120
    assert temp_files(root) == []
    assert store.used_bytes == sum(p.stat().st_size for p in chunk_files(root))
    all_chunks_valid(root)


# -- a writer killed mid-write, while another process keeps running -------------------------------

_BLOCKED_WRITER = """
import sys, time
from lmcache_core.storage_backend import disk_io
store = open_disk({root!r})
writes = []
def stall(op, path):
    if op == "write":
        writes.append(path)
        if len(writes) == 2:  # a 4 MiB chunk's payload is written, then its header: stop there
            print("writing", flush=True)
            time.sleep(3600)
disk_io.set_fault_hook(stall)
store.put(make_key("dead"), chunk(7, (2, 2, 256, 8, 256)))
"""


def kill_a_writer_mid_write(root: Path) -> None:
    """A real process opens the store and is SIGKILLed inside its put (temp file open)."""
    code = "from tests.test_disk_audit7 import *\n" + _BLOCKED_WRITER.format(root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    temps = temp_files(root)
    assert len(temps) == 1 and temps[0].stat().st_size >= 4 << 20


def test_a_full_disk_removes_a_killed_writers_temp_file_before_any_chunk(tmp_path):
    """Start-up removes dead writers' temp files, but a process that keeps running never
    starts again: it left them, and on a full disk evicted live chunks instead."""
    root = tmp_path / "store"
    store = open_disk(root)
    keys = filled(store, 3)
    kill_a_writer_mid_write(root)
    with disk_io.fault_hook(disk_io.Fault("write", errno.ENOSPC, times=1)):
        store.put(make_key("new"), chunk(9))
    assert temp_files(root) == []
    assert store.stats["stale_temps_removed"] == 1 and store.stats["full_disk_evictions"] == 0
    assert all(store.get(k) is not None for k in keys)
    assert torch.equal(store.get(make_key("new")), chunk(9))
    store.close()


def test_a_writer_killed_mid_write_restarts_clean_beside_a_running_process(tmp_path):
    root = tmp_path / "store"
    running = open_disk(root)
    keys = filled(running, 3)
    kill_a_writer_mid_write(root)
    assert running.get(make_key("dead")) is None and all(running.get(k) is not None for k in keys)
    restarted = open_disk(root)
    assert restarted.stale_temps_removed == 1 and temp_files(root) == []
    assert all(torch.equal(restarted.get(k), chunk(i)) for i, k in enumerate(keys))
    restarted.put(make_key("dead"), chunk(7, (2, 2, 256, 8, 256)))
    assert torch.equal(running.get(make_key("dead")), chunk(7, (2, 2, 256, 8, 256)))
    restarted.close()
    running.close()


# -- 2. processes sharing one directory ------------------------------------------------------------

_WORKER = """
import json, random, sys, time, traceback
role, tag, seed, seconds = {role!r}, {tag!r}, {seed}, {seconds}
rng = random.Random(seed)
store = open_disk({root!r}, {budget})
errors, acked, n = [], {{}}, 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline or n < 40:
    n += 1
    slot = rng.randrange(12)
    name = f"{{tag if rng.random() < 0.5 or role != 'writer' else 'shared'}}-{{slot}}"
    key = make_key(name)
    try:
        r = rng.random()
        if role == "writer" and r < 0.45:
            version = seed * 100000 + n
            store.put(key, versioned(name, version), blocking=rng.random() < 0.5)
            acked[name] = version
        elif role == "writer" and r < 0.55:
            store.remove(key)
            acked[name] = None
        elif r < 0.85:
            got = store.batched_get([key, make_key(f"shared-{{slot}}")]) if r > 0.75 else [store.get(key)]
            if not is_versioned(name, got[0]):
                errors.append(f"{{name}}: a wrong chunk read")
        else:
            store.contains(key); store.read_header(key); store.list()
    except Exception:
        errors.append(traceback.format_exc(limit=5))
store.close()
print(json.dumps({{"errors": errors, "acked": acked, "ops": n}}))
"""


def versioned(name: str, version: int) -> torch.Tensor:
    """A chunk that names its key and version (so any process can check what it reads)."""
    t = chunk(version, (2, 2, 8, 2, 16)).float()
    t.view(-1)[0] = float(sum(name.encode()))
    t.view(-1)[1] = float(version)
    return t


def is_versioned(name: str, got: torch.Tensor | None) -> bool:
    if got is None:
        return True
    flat = got.reshape(-1)
    return int(flat[0]) == sum(name.encode()) and torch.equal(got, versioned(name, int(flat[1])))


def spawn_worker(root: Path, role: str, tag: str, seed: int, seconds: float, budget: int | None = None) -> subprocess.Popen[str]:
    code = "from tests.test_disk_audit7 import *\n" + _WORKER.format(
        root=str(root), role=role, tag=tag, seed=seed, seconds=seconds, budget=budget
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_processes_put_get_remove_shared_and_own_keys_and_lose_no_acknowledged_write(tmp_path):
    """3 writers (own keys and 12 shared ones, blocking and queued puts, removes) and a
    reader; a process reopening the store all along. No exception, no wrong chunk; after,
    each writer's own keys hold exactly what it last acknowledged (no budget: no eviction)."""
    root = tmp_path / "store"
    open_disk(root).close()
    procs = [spawn_worker(root, "writer", f"w{i}", i + 1, 1.5) for i in range(3)]
    procs.append(spawn_worker(root, "reader", "w0", 9, 1.5))
    reopened = 0
    while any(p.poll() is None for p in procs):
        opened = open_disk(root)  # an index rebuild while they write
        assert opened.stale_temps_removed == 0  # a live writer's temp file is never taken
        opened.close()
        reopened += 1
    results = [collect(p) for p in procs]
    assert [r["errors"] for r in results] == [[], [], [], []]
    assert reopened > 0 and all(r["ops"] >= 40 for r in results)
    store = open_disk(root)
    for r in results[:3]:
        for name, version in r["acked"].items():
            if name.startswith("shared"):
                continue  # several writers: any of their versions
            got = store.get(make_key(name))
            if version is None:
                assert got is None, f"{name}: removed, yet back"
            else:
                assert got is not None and torch.equal(got, versioned(name, version)), f"{name}: lost"
    for slot in range(12):
        assert is_versioned(f"shared-{slot}", store.get(make_key(f"shared-{slot}")))
    assert temp_files(root) == []
    store.close()


def test_processes_evicting_under_small_budgets_while_others_read(tmp_path):
    """Every process has a budget of a few chunks: eviction by one races reads, writes
    and evictions in the others. Misses are allowed, exceptions and wrong chunks are not."""
    root = tmp_path / "store"
    size = chunk_format.stored_size(versioned("x", 1), make_key("x").to_string())
    procs = [spawn_worker(root, "writer", f"e{i}", 20 + i, 1.5, budget=(4 + i) * size) for i in range(3)]
    procs.append(spawn_worker(root, "reader", "e0", 29, 1.5, budget=3 * size))
    results = [collect(p) for p in procs]
    assert [r["errors"] for r in results] == [[], [], [], []]
    store = open_disk(root)
    assert temp_files(root) == []
    all_chunks_valid(root)
    store.close()


def test_the_cli_reads_and_verifies_a_store_a_process_is_writing(tmp_path):
    root = tmp_path / "store"
    open_disk(root).close()
    writer = spawn_worker(root, "writer", "cli", 40, 4.0)
    runs = []
    try:
        for cmd in (["ls", "-l"], ["verify"], ["stats"], ["show", make_key("cli-1").to_string()]):
            p = subprocess.run([LMCACHE, "--store", str(root), *cmd, "--format", "json"], capture_output=True, text=True, timeout=60)
            runs.append((cmd[0], p.returncode, p.stderr[-500:]))
    finally:
        result = collect(writer)
    assert result["errors"] == []
    # show may find the key removed or not yet written (exit 1, "not in"); the rest succeed.
    assert all(rc == 0 for cmd, rc, _ in runs if cmd != "show"), runs
    assert all(rc == 0 or "not in" in err for cmd, rc, err in runs if cmd == "show"), runs
    p = subprocess.run([LMCACHE, "--store", str(root), "verify", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["temp_files"] == []


# -- regression: a corrupt chunk's removal and another process's rewrite ---------------------------


def test_regression_removing_a_corrupt_chunk_deleted_the_good_one_another_process_wrote(tmp_path):
    """A get finds the chunk corrupt and removes it; another process (here: a real one,
    started at the worst moment, between the identity check and the unlink) has renamed a
    good chunk over it. The key lock only orders this process's puts: the plain unlink
    deleted the other process's acknowledged chunk."""
    root = tmp_path / "store"
    store = open_disk(root)
    key = make_key("rot")
    store.put(key, chunk(1))
    path = store._path(key)
    with open(path, "r+b") as f:  # the payload rots
        f.seek(-1, 2)
        f.write(b"\xff")
    rewrites: list[str] = []

    def another_process_rewrites(op: str, p: str) -> None:
        if op == "unlink" and p == path and not rewrites:
            run_python(f"s = open_disk({str(root)!r}); s.put(make_key('rot'), chunk(2)); s.close()")
            rewrites.append(p)

    with disk_io.fault_hook(another_process_rewrites):
        assert store.get(key) is None  # the corrupt one: a miss
    assert rewrites and store.stats["corrupt"] == 1
    got = store.get(key)
    assert got is not None and torch.equal(got, chunk(2)), "the other process's chunk was deleted"
    assert temp_files(root) == []
    # And with no rewrite the corrupt chunk is removed as before.
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    assert store.get(key) is None and not os.path.exists(path)
    assert temp_files(root) == []
    store.close()
