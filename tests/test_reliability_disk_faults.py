"""Disk faults: a really full disk (small tmpfs) and injected EIO/ENOSPC.

The promise under test (docs/RELIABILITY.md, disk tier): a failed write is
reported (an exception for a blocking put, a counter and a log line for a
background one), leaves nothing half-written (no temp file, no torn chunk, an
older version of the key intact), reads keep working meanwhile, and the store
works again once the fault is gone. A full disk first lets go of the tier's least
recently used chunks and tries again.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, chunk_format
from lmcache_core.errors import StoreFullError
from lmcache_core.layout import TEMP_SUFFIX, key_to_path
from lmcache_core.storage_backend import disk_io
from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend
from tests.conftest import make_key

KiB = 1024
SHAPE = (2, 2, 64, 4, 32)  # 64 KiB of fp16 per chunk


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).half()


def open_disk(root: Path, *, fsync: bool = False) -> LMCLocalDiskBackend:
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(root), max_local_disk_size=1.0)
    return LMCLocalDiskBackend(cfg, None, "cpu", fsync=fsync)


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def all_chunks_valid(root: Path) -> int:
    """Decode every chunk file under ``root`` with checksums; returns how many."""
    n = 0
    for p in root.rglob("*.safetensors"):
        chunk_format.decode(p.read_bytes())  # raises CorruptChunkError on a torn file
        n += 1
    return n


# -- a really full disk ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A 1 MiB tmpfs when we may mount one (root), else a plain directory.

    Yields (directory, is_real_tmpfs); without a real one the tests inject ENOSPC.
    """
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = False
    if os.geteuid() == 0:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
        )
        mounted = proc.returncode == 0
    try:
        yield mnt, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_lets_go_of_its_oldest_chunks_and_reads_keep_working(small_disk):
    """The budget (1 GB) is far larger than the disk (1 MiB): once the disk is full, a
    put unlinks the tier's least recently used chunks and lands, where it used to fail
    every put for good. Nothing is half-written and every chunk still held reads back."""
    root, real = small_disk
    store = open_disk(root / "store")
    # Without a real tmpfs the disk is "full" once, after ~10 chunks.
    fault = disk_io.Fault("write", errno.ENOSPC, after=2 * 10, times=1)
    previous = disk_io.set_fault_hook(None if real else fault)
    try:
        for i in range(100):  # 100 x 64 KiB cannot fit in 1 MiB
            store.put(make_key(i), chunk(i))
        store.put(make_key("bg"), chunk(7), blocking=False)  # a background write lands too
        assert torch.equal(store.get(make_key("bg")), chunk(7))
    finally:
        disk_io.set_fault_hook(previous)
    assert store.stats["full_disk_evictions"] >= 1
    assert store.stats["put_failures"] == 0 and store.stats["background_put_failures"] == 0
    held = [i for i in range(100) if store.contains(make_key(i))]
    assert 99 in held and len(held) < 100  # the newest stays; the oldest made room
    assert temp_files(root) == []
    for i in range(100):
        got = store.get(make_key(i))
        assert torch.equal(got, chunk(i)) if i in held else got is None
    assert all_chunks_valid(root) == len(held) + 1
    store.close()
    # A restart on the full disk sees exactly the chunks the store held.
    again = open_disk(root / "store")
    assert [i for i in range(100) if again.contains(make_key(i))] == held
    assert torch.equal(again.get(make_key(held[-1])), chunk(held[-1]))
    assert temp_files(root) == []
    again.close()


def test_enospc_on_overwrite_keeps_the_old_version(small_disk):
    root, real = small_disk
    store = open_disk(root / "store")
    store.put(make_key("old"), chunk(1))
    ballast = root / "ballast"
    if real:  # fill the tmpfs to the last byte with a foreign file
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * (4 * KiB)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
    previous = disk_io.set_fault_hook(None if real else disk_io.Fault("write", errno.ENOSPC))
    try:
        with pytest.raises(StoreFullError):
            store.put(make_key("old"), chunk(2))
    finally:
        disk_io.set_fault_hook(previous)
    assert torch.equal(store.get(make_key("old")), chunk(1))
    assert temp_files(root) == []
    if real:
        ballast.unlink()
    store.put(make_key("old"), chunk(2))
    assert torch.equal(store.get(make_key("old")), chunk(2))
    store.close()


# -- injected EIO on each write step ----------------------------------------------------------
# (ENOSPC on each step, which now lets go of the oldest chunks and tries again, is in
# tests/test_disk_audit7.py.)


@pytest.mark.parametrize("op", ["open", "write", "fsync", "replace"])
def test_write_fault_is_reported_and_leaves_nothing_half_written(tmp_path, op):
    err = errno.EIO
    root = tmp_path / "store"
    store = open_disk(root, fsync=True)
    store.put(make_key("keep"), chunk(1))
    store.put(make_key("over"), chunk(2))
    fault = disk_io.Fault(op, err, times=2)
    with disk_io.fault_hook(fault):
        with pytest.raises(OSError) as info:
            store.put(make_key("new"), chunk(3))
        assert info.value.errno == err and not isinstance(info.value, StoreFullError)
        with pytest.raises(OSError):
            store.put(make_key("over"), chunk(4))  # a failed overwrite
        assert fault.failures == 2
        # Reads keep working while writes fail.
        assert torch.equal(store.get(make_key("keep")), chunk(1))
    assert store.stats["put_failures"] == 2
    assert temp_files(root) == []
    assert store.get(make_key("new")) is None
    assert not (root / key_to_path(make_key("new"))).exists()
    assert torch.equal(store.get(make_key("over")), chunk(2))  # old version intact
    assert all_chunks_valid(root) == 2
    # The fault is gone: the same writes now succeed.
    store.put(make_key("new"), chunk(3))
    store.put(make_key("over"), chunk(4))
    assert torch.equal(store.get(make_key("new")), chunk(3))
    assert torch.equal(store.get(make_key("over")), chunk(4))
    store.close()


@pytest.mark.parametrize("op", ["write", "fsync", "replace"])
def test_background_write_fault_is_counted_and_logged(tmp_path, op, caplog):
    store = open_disk(tmp_path / "store", fsync=True)
    with disk_io.fault_hook(disk_io.Fault(op, errno.EIO)), caplog.at_level(logging.ERROR):
        store.put(make_key(1), chunk(1), blocking=False)
        assert store.get(make_key(1)) is None  # waits for the write: a miss, not an error
    assert store.stats["background_put_failures"] == 1
    assert any("background write" in r.getMessage() for r in caplog.records)
    assert temp_files(tmp_path) == []
    store.close()  # nothing pending raises at close


@pytest.mark.parametrize(
    "op, after", [("open", 0), ("read", 0), ("read", 2)], ids=["open", "header-read", "payload-read"]
)
def test_eio_on_read_is_a_miss_and_the_chunk_survives(tmp_path, op, after):
    root = tmp_path / "store"
    store = open_disk(root)
    store.put(make_key(1), chunk(1))
    with disk_io.fault_hook(disk_io.Fault(op, errno.EIO, after=after, times=1)):
        assert store.get(make_key(1)) is None
    with disk_io.fault_hook(disk_io.Fault(op, errno.EIO)):
        assert store.read_header(make_key(1)) is None
    assert store.stats["read_errors"] == 1
    assert store.stats["corrupt"] == 0  # an I/O error is not evidence of corruption
    # The file was not deleted: once the disk answers again the chunk is back.
    assert torch.equal(store.get(make_key(1)), chunk(1))
    store.close()


def test_eio_on_unlink_during_remove_is_reported_and_store_stays_consistent(tmp_path):
    root = tmp_path / "store"
    store = open_disk(root)
    store.put(make_key(1), chunk(1))
    with disk_io.fault_hook(disk_io.Fault("unlink", errno.EIO)):
        with pytest.raises(OSError):
            store.remove(make_key(1))
    # The file is still whole; a reader gets the right bytes (or, after remove, a miss).
    got = store.get(make_key(1))
    assert got is None or torch.equal(got, chunk(1))
    assert store.remove(make_key(1)) or got is None
    assert store.get(make_key(1)) is None
    store.close()


def test_fault_hook_costs_nothing_when_not_installed(tmp_path):
    """With no hook the layer hands out builtin file objects, not wrappers."""
    assert disk_io.set_fault_hook(None) is None
    path = str(tmp_path / "f")
    with disk_io.open_write(path) as f:
        assert type(f).__module__ == "_io"
    with disk_io.open_read(path) as f:
        assert type(f).__module__ == "_io"


def test_regression_store_full_error_carried_no_errno():
    """Bug: StoreFullError was an OSError with errno None, so ``errno == ENOSPC`` checks missed it."""
    exc = StoreFullError("disk /x", "no space")
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    assert str(exc) == "disk /x: no space"


@pytest.mark.parametrize("after", [2, 5], ids=["first-payload-piece", "a-later-piece"])
def test_eio_on_a_large_chunks_split_read_is_a_miss_and_the_chunk_survives(tmp_path, after):
    """From SPLIT_READ_MIN_BYTES on a get reads on two threads (chunk_format._SplitRead);
    an EIO on any piece is still a read error, not corruption."""
    root = tmp_path / "store"
    store = open_disk(root)
    n = chunk_format.SPLIT_READ_MIN_BYTES + 3 * chunk_format.READ_PIECE_BYTES
    big = torch.randn(n // 2, generator=torch.Generator().manual_seed(9)).half()
    store.put(make_key(1), big)
    fault = disk_io.Fault("read", errno.EIO, after=after, times=1)
    with disk_io.fault_hook(fault):
        assert store.get(make_key(1)) is None
    assert fault.failures == 1
    assert store.stats["read_errors"] == 1
    assert store.stats["corrupt"] == 0
    assert torch.equal(store.get(make_key(1)), big)  # the file was kept
    store.close()


def test_a_full_disk_under_a_file_remote_is_a_full_store_not_an_outage(small_disk):
    """Found by review: the disk tier reported ENOSPC as a full store, its twin (a
    ``fsspec+file://`` remote's put) as an I/O error: retried, and struck against the circuit,
    so reads of a healthy directory became misses for the circuit's cooldown."""
    from lmcache_core.storage_backend import open_backend

    root, real = small_disk
    store = open_backend(f"fsspec+file://{root}/remote", remote_timeout=2)
    stored: list[int] = []
    previous = disk_io.set_fault_hook(None if real else disk_io.Fault("write", errno.ENOSPC, after=2 * 10))
    try:
        with pytest.raises(StoreFullError):
            for i in range(100):  # 100 x 64 KiB cannot fit in 1 MiB
                store.put(make_key(i), chunk(i))
                stored.append(i)
        assert 3 <= len(stored) < 100
        assert store.stats["retries"] == 0 and store.breaker.state == "closed"  # an answer, no outage
        for i in stored:  # reads keep working
            assert torch.equal(store.get(make_key(i)), chunk(i))
        assert temp_files(root) == []  # nothing half-written left
    finally:
        disk_io.set_fault_hook(previous)
        store.close()
