"""A large read of a file not in the page cache is read by one thread, in order.

Two threads reading pieces at spread offsets (the split that makes hot reads of 16 MiB
or more faster) defeated the kernel's readahead on cold files. ``chunk_format._cached``
tells the two apart with a ``preadv(RWF_NOWAIT)`` of one byte; these tests hold it to
what ``mincore`` says of the same pages, and the read to the right bytes either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmcache_core import chunk_format
from lmcache_core.bench import drop_page_cache, resident_fraction

SIZE = chunk_format.SPLIT_READ_MIN_BYTES  # the smallest read that splits when hot


def _chunk_file(path: Path) -> torch.Tensor:
    tensor = torch.randint(0, 255, (SIZE,), dtype=torch.uint8)
    with open(path, "wb") as f:
        chunk_format.write_chunk(f, tensor, "k")
    return tensor


def _read(path: Path, splits: list[int]) -> torch.Tensor:
    run = chunk_format._SplitRead.run

    def counted(self: object, *args: object) -> object:
        splits.append(1)
        return run(self, *args)  # type: ignore[arg-type]

    chunk_format._SplitRead.run = counted  # type: ignore[method-assign]
    try:
        with open(path, "rb", buffering=0) as f:
            header = chunk_format.read_header(f, total_size=os.fstat(f.fileno()).st_size)
            dest = torch.empty(header.nbytes, dtype=torch.uint8)
            chunk_format.read_payload_verified(f, header, dest)
            return dest
    finally:
        chunk_format._SplitRead.run = run  # type: ignore[method-assign]


def test_a_hot_large_read_splits_and_a_cold_one_reads_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    tensor = _chunk_file(path)
    last = os.path.getsize(path) - 1

    with open(path, "rb") as f:  # hot: just written
        assert chunk_format._cached(f, last)
    splits: list[int] = []
    assert torch.equal(_read(path, splits), tensor)
    assert splits == [1]

    drop_page_cache([str(path)])
    resident = resident_fraction([str(path)])
    with open(path, "rb") as f:
        cached = chunk_format._cached(f, last)
    if resident is not None and resident < 0.5:  # really evicted (not tmpfs, which keeps all)
        assert not cached
    elif resident is not None and resident == 1.0:
        assert cached
    drop_page_cache([str(path)])  # again: a probe that finds a page missing may start reading it ahead
    splits.clear()
    assert torch.equal(_read(path, splits), tensor)
    assert splits == ([] if not cached else [1])


def test_a_file_without_a_descriptor_counts_as_cached() -> None:
    class NoFd:
        def fileno(self) -> int:
            raise OSError("no descriptor")

    assert chunk_format._cached(NoFd(), 0)
