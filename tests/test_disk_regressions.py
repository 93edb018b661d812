"""Regressions of the disk tier (``LMCLocalDiskBackend``), on real files.

* overwrites of one key: the last submitted put (or remove) wins, whatever the
  mix of blocking and non-blocking calls and the order the workers finish in;
* ``put_worker()`` is the seed's no-argument writer loop; close drains it;
* the budget covers whole files (header + payload), not just payloads;
* a file written with the seed's ``save_disk(path, kv_chunk)`` (no key) is read
  back as the key of its path.
"""

from __future__ import annotations

import inspect
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, chunk_format
from lmcache_core.layout import key_to_path
from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend, save_disk
from tests.conftest import make_key

GB = 1024**3
MiB = 1024 * 1024


def open_disk(root: Path, budget_bytes: int | None = None, **kw: object) -> LMCLocalDiskBackend:
    size = 1.0 if budget_bytes is None else budget_bytes / GB
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(root), max_local_disk_size=size)
    return LMCLocalDiskBackend(cfg, None, "cpu", **kw)  # type: ignore[arg-type]


def filled(value: int, nbytes: int) -> torch.Tensor:
    """A uint8 chunk of ``nbytes`` bytes all equal to ``value`` (so a torn mix is visible)."""
    return torch.full((nbytes,), value, dtype=torch.uint8)


def file_of(root: Path, key) -> Path:  # noqa: ANN001
    return root / key_to_path(key)


# -- 1. last submitted put wins ------------------------------------------------------------------


def test_nonblocking_overwrite_big_then_small_returns_the_newest(tmp_path):
    store = open_disk(tmp_path)
    big, small = filled(1, 4 * MiB), filled(2, 16)
    try:
        for i in range(12):
            key = make_key(f"ow{i}")
            store.put(key, big, blocking=False)
            store.put(key, small, blocking=False)
            got = store.get(key)
            assert got is not None and torch.equal(got, small), f"round {i}: older value served"
        store.close()
        # And what is on disk (after every worker finished) is the newest too.
        again = open_disk(tmp_path)
        for i in range(12):
            key = make_key(f"ow{i}")
            assert torch.equal(again.get(key), small)
            assert again._index.size_of(key) == file_of(tmp_path, key).stat().st_size
        again.close()
    finally:
        store.close()


def test_blocking_put_after_nonblocking_put_wins(tmp_path):
    store = open_disk(tmp_path)
    big, small = filled(3, 4 * MiB), filled(4, 16)
    for i in range(8):
        key = make_key(f"mix{i}")
        store.put(key, big, blocking=False)
        store.put(key, small, blocking=True)
        assert torch.equal(store.get(key), small), f"round {i}"
    store.close()
    for i in range(8):
        key = make_key(f"mix{i}")
        assert chunk_format.decode(file_of(tmp_path, key).read_bytes()).numel() == 16


def test_remove_after_pending_puts_leaves_nothing(tmp_path):
    store = open_disk(tmp_path)
    big = filled(5, 4 * MiB)
    keys = [make_key(f"rm{i}") for i in range(6)]
    for key in keys:
        store.put(key, big, blocking=False)
        store.put(key, filled(6, 16), blocking=False)
        store.remove(key)
        assert store.get(key) is None
        assert not store.contains(key)
    store.close()
    for key in keys:
        assert not file_of(tmp_path, key).exists()
    assert store.used_bytes == 0


def test_random_mix_of_puts_and_removes_from_one_thread_matches_a_model(tmp_path):
    rng = random.Random(1234)
    store = open_disk(tmp_path)
    keys = [make_key(f"mdl{i}") for i in range(3)]
    model: dict[object, torch.Tensor | None] = {k: None for k in keys}
    sizes = [16, 4096, 1 * MiB, 4 * MiB]
    for step in range(60):
        key = rng.choice(keys)
        op = rng.random()
        if op < 0.2:
            store.remove(key)
            model[key] = None
        else:
            value = filled(step % 250 + 1, rng.choice(sizes))
            store.put(key, value, blocking=op < 0.45)
            model[key] = value
        if rng.random() < 0.3:
            probe = rng.choice(keys)
            got = store.get(probe)
            want = model[probe]
            assert (got is None) == (want is None), f"step {step}"
            assert want is None or torch.equal(got, want), f"step {step}: stale value"
    for key in keys:
        got, want = store.get(key), model[key]
        assert (got is None) == (want is None)
        assert want is None or torch.equal(got, want)
    store.close()
    again = open_disk(tmp_path)
    for key in keys:
        want = model[key]
        got = again.get(key)
        assert (got is None) == (want is None)
        assert want is None or torch.equal(got, want)
    assert again.used_bytes == sum(file_of(tmp_path, k).stat().st_size for k in keys if model[k] is not None)
    again.close()


def test_many_threads_writing_one_key_leave_one_whole_value_and_matching_index(tmp_path):
    store = open_disk(tmp_path, put_workers=4)
    key = make_key("hot")
    values = {t: filled(t + 1, (t + 1) * 64 * 1024 + 8 * t) for t in range(6)}
    errors: list[str] = []
    stop = threading.Event()

    def writer(t: int) -> None:
        for j in range(15):
            store.put(key, values[t], blocking=(j % 3 == 0))

    def reader() -> None:
        while not stop.is_set():
            got = store.get(key)
            if got is None:
                continue
            first = int(got[0])
            want = values.get(first - 1)
            whole = want is not None and got.numel() == want.numel() and bool((got == first).all())
            if not whole:
                errors.append(f"torn value: {got.numel()} bytes starting with {first}")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for th in readers + writers:
        th.start()
    for th in writers:
        th.join()
    stop.set()
    for th in readers:
        th.join()
    assert errors == []
    got = store.get(key)
    assert got is not None
    first = int(got[0])
    assert torch.equal(got, values[first - 1])
    path = file_of(tmp_path, key)
    assert store._index.size_of(key) == path.stat().st_size
    assert store.used_bytes == path.stat().st_size
    store.close()
    assert store._index.size_of(key) == path.stat().st_size
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_nonblocking_puts_of_different_keys_all_land(tmp_path):
    store = open_disk(tmp_path, put_workers=3)
    keys = [make_key(f"par{i}") for i in range(40)]
    for i, key in enumerate(keys):
        store.put(key, filled(i + 1, 8192), blocking=False)
    for i, key in enumerate(keys):
        assert torch.equal(store.get(key), filled(i + 1, 8192))
    store.close()


# -- 2. put_worker() is the seed's no-argument writer loop ---------------------------------------


def test_put_worker_takes_no_arguments():
    params = list(inspect.signature(LMCLocalDiskBackend.put_worker).parameters)
    assert params == ["self"]


def test_writer_threads_run_put_worker_and_close_drains_every_queued_write(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    store = open_disk(tmp_path, put_workers=2)
    workers = [t for t in threading.enumerate() if t.ident not in before and "disk-put" in t.name]
    assert len(workers) == 2
    keys = [make_key(f"drain{i}") for i in range(60)]
    for i, key in enumerate(keys):
        store.put(key, filled(i % 250 + 1, 32 * 1024), blocking=False)
    store.close()  # returns only once every queued write is on disk
    assert not any(t.is_alive() for t in workers)
    for i, key in enumerate(keys):
        data = file_of(tmp_path, key).read_bytes()
        assert torch.equal(chunk_format.decode(data, key.to_string()), filled(i % 250 + 1, 32 * 1024))
    with pytest.raises(RuntimeError):
        store.put(make_key("late"), filled(1, 16), blocking=False)
    store.close()  # idempotent


# -- 3. the budget covers whole files ------------------------------------------------------------


def test_chunk_whose_file_exceeds_the_budget_is_refused_and_evicts_nothing(tmp_path):
    budget = 4096
    store = open_disk(tmp_path, budget_bytes=budget)
    small = [make_key(f"s{i}") for i in range(3)]
    for i, key in enumerate(small):
        store.put(key, filled(i + 1, 256))
    used = store.used_bytes
    assert used <= budget
    for blocking in (True, False):
        with pytest.raises(ValueError) as info:
            store.put(make_key("whole"), filled(9, budget), blocking=blocking)
        msg = str(info.value)
        assert str(budget) in msg and "header" in msg
    assert store.used_bytes == used
    for i, key in enumerate(small):
        assert torch.equal(store.get(key), filled(i + 1, 256))
    store.close()


def test_disk_usage_never_exceeds_the_budget(tmp_path):
    budget = 4096
    store = open_disk(tmp_path, budget_bytes=budget)
    header = len(chunk_format.encode_header(filled(0, 1), make_key("h").to_string())) - 1
    # Chunks that fit only with their header counted.
    for i, nbytes in enumerate([3000, 1000, 4096 - header - 64, 200, 2048, 1500]):
        key = make_key(f"b{i}")
        store.put(key, filled(i + 1, nbytes))
        on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
        assert store.used_bytes <= budget
        assert on_disk <= budget
        assert torch.equal(store.get(key), filled(i + 1, nbytes))
    store.close()


# -- 4. save_disk(path, kv_chunk) without a key --------------------------------------------------


def test_save_disk_without_key_at_layout_path_is_read_back_as_that_key(tmp_path):
    key = make_key("seed-style")
    path = file_of(tmp_path, key)
    path.parent.mkdir(parents=True)
    value = filled(7, 1000)
    save_disk(str(path), value)
    store = open_disk(tmp_path)
    assert store.contains(key)
    got = store.get(key)
    assert got is not None and torch.equal(got, value)
    assert path.exists()  # not deleted as corrupt
    assert store.used_bytes == path.stat().st_size
    store.close()


def test_seed_style_chunk_with_empty_key_is_served_for_its_path(tmp_path):
    key = make_key("empty-key")
    path = file_of(tmp_path, key)
    path.parent.mkdir(parents=True)
    value = filled(8, 512)
    with open(path, "wb") as f:  # what an old save_disk without a key wrote
        chunk_format.write_chunk(f, value, "")
    store = open_disk(tmp_path)
    got = store.get(key)
    assert got is not None and torch.equal(got, value)
    store.close()


def test_chunk_naming_another_key_is_still_refused(tmp_path):
    mine, other = make_key("mine"), make_key("other")
    path = file_of(tmp_path, mine)
    path.parent.mkdir(parents=True)
    save_disk(str(path), filled(9, 64), other.to_string())
    store = open_disk(tmp_path)
    assert store.get(mine) is None
    assert not path.exists()  # removed as foreign
    store.close()


def test_save_disk_without_key_outside_a_store_still_writes(tmp_path):
    path = tmp_path / "loose.safetensors"
    save_disk(str(path), filled(3, 32))
    header = chunk_format.parse_header(path.read_bytes())
    assert header.key == ""
    assert torch.equal(chunk_format.decode(path.read_bytes()), filled(3, 32))


def test_regression_large_queued_puts_are_written_at_interpreter_exit(tmp_path):
    """The exit drain writes queued chunks after concurrent.futures has shut its pools:
    a chunk of OVERLAP_MIN_BYTES or more (its checksum hashed on a helper thread while
    it is written) failed its submit there, and each such acknowledged put was lost."""
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "disk"
    shape = (chunk_format.OVERLAP_MIN_BYTES // (2 * 64 * 8 * 4), 2, 64, 8, 4)  # float32: 4 MiB
    child = textwrap.dedent(
        f"""
        import torch
        from lmcache_core import LMCacheEngineConfig
        from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend
        from tests.conftest import make_key
        cfg = LMCacheEngineConfig(local_device=None, local_disk={str(root)!r}, max_local_disk_size=1.0)
        b = LMCLocalDiskBackend(cfg, None, "cpu", put_workers=1)
        for i in range(6):
            b.put(make_key(i), torch.full({shape!r}, float(i)), blocking=False)
        # no close(): the interpreter exits with the puts queued
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stderr
    assert "failed" not in done.stderr, done.stderr
    backend = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(root), max_local_disk_size=1.0), None, "cpu"
    )
    for i in range(6):
        got = backend.get(make_key(i))
        assert got is not None and got.shape == shape and bool((got == float(i)).all()), i
    backend.close()


def test_regression_a_read_during_a_quarantine_left_a_ghost_index_entry(tmp_path):
    """A corrupt chunk is taken out of the index, then unlinked: a contains() in between
    indexed the file again, so after the unlink the key was 'cached' with no file."""
    from lmcache_core.storage_backend import disk_io

    backend = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path), max_local_disk_size=0.01), None, "cpu"
    )
    key = make_key(1)
    backend.put(key, torch.ones(1, 2, 4, 2, 8))
    path = backend._path(key)
    with open(path, "r+b") as f:  # the payload rots
        f.seek(-1, 2)
        f.write(b"\xff")
    seen: list[bool] = []

    def between_index_and_unlink(op: str, p: str) -> None:
        if op == "unlink" and p == path:
            seen.append(backend.contains(key))  # another thread, at the worst moment

    with disk_io.fault_hook(between_index_and_unlink):
        assert backend.get(key) is None
    assert seen == [True]  # the file was still there when contains() ran
    assert not Path(path).exists()
    assert not backend.contains(key) and backend.used_bytes == 0 and backend.list() == []
    backend.close()


def test_regression_chunks_another_process_removed_no_longer_send_live_ones_out(tmp_path):
    """``lmcache evict --older-than`` (another process) removed the oldest chunks; the
    server still counted their bytes, and its next put evicted a live chunk with the
    disk half empty. Picked victims whose file is gone are forgotten, for free."""
    one = torch.ones(1, 2, 16, 2, 8)
    size = chunk_format.stored_size(one, make_key(0).to_string())
    cfg = LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path), max_local_disk_size=5 * size / 1024**3)
    backend = LMCLocalDiskBackend(cfg, None, "cpu")
    for i in range(5):
        backend.put(make_key(i), one * i)
    for i in range(2):  # the two oldest, removed by another process
        os.unlink(backend._path(make_key(i)))
    backend.put(make_key(9), one * 9)
    assert backend.stats["evictions"] == 0 and backend.stats["forgotten"] == 1
    assert all(backend.get(make_key(i)) is not None for i in (2, 3, 4, 9))
    # Key 1's bytes are still counted: a ghost at the LRU end, forgotten when next picked.
    assert backend.used_bytes == 5 * size
    backend.close()


def test_a_served_chunk_is_marked_used_on_disk_where_reads_leave_atime_alone(tmp_path, monkeypatch):
    """On relatime (and noatime) mounts a read leaves a file's atime alone once it is
    newer than the file's mtime and ctime: the LRU order that a restart and the tools
    rebuild from it ignored what the server served."""
    from lmcache_core.storage_backend import local_backend

    monkeypatch.setattr(local_backend, "ATIME_REFRESH_S", 0.0)  # every get refreshes: no hour to wait
    backend = LMCLocalDiskBackend(
        LMCacheEngineConfig(local_device=None, local_disk=str(tmp_path), max_local_disk_size=0.01), None, "cpu"
    )
    backend.put(make_key("hot"), torch.ones(1, 2, 4, 2, 8))
    path = backend._path(make_key("hot"))
    written = os.stat(path).st_mtime_ns
    assert backend.get(make_key("hot")) is not None  # the kernel too sets atime at a first read
    first = os.stat(path).st_atime_ns
    time.sleep(0.05)  # the clock moves on (the kernel's timestamps are coarse)
    assert backend.get(make_key("hot")) is not None  # relatime: the kernel leaves it now
    st = os.stat(path)
    assert st.st_atime_ns > first and st.st_mtime_ns == written
    backend.close()
