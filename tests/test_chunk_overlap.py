"""The overlapped checksum paths of the chunk format (large payloads).

``write_chunk`` hashes on a helper thread while it writes, then writes the
header last; ``read_payload_verified`` hashes each piece right after reading it.
Both must produce and accept exactly the bytes of the plain, sequential format.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from lmcache_core import chunk_format as cf
from lmcache_core.errors import CorruptChunkError

KEY = "vllm@m@1@0@" + "cd" * 32


# Large enough to be written with the helper and read split over two threads.
BIG = max(cf.OVERLAP_MIN_BYTES, cf.SPLIT_READ_MIN_BYTES) + 3 * cf.READ_PIECE_BYTES + 1234


def big(seed: int = 0, nbytes: int = BIG) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**15), 2**15, (nbytes // 2,), generator=g, dtype=torch.int16).view(torch.float16)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bit patterns include NaNs, which ``==`` never matches)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def flip_bit(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def write_file(path: str, t: torch.Tensor, key: str = KEY) -> int:
    with open(path, "wb", buffering=0) as f:
        return cf.write_chunk(f, t, key)


def stored(tmp_path: Any, *big_args: int) -> tuple[torch.Tensor, str]:
    """``big(*big_args)`` written as a chunk to ``tmp_path/c.safetensors``: (tensor, path)."""
    t = big(*big_args)
    path = str(tmp_path / "c.safetensors")
    write_file(path, t)
    return t, path


def read_file(path: str, key: str = KEY) -> torch.Tensor:
    with open(path, "rb", buffering=0) as f:
        header = cf.read_header(f, total_size=os.fstat(f.fileno()).st_size)
        cf.check_identity(header, key)
        dest = torch.empty(header.nbytes, dtype=torch.uint8)
        cf.read_payload_verified(f, header, dest)
    return dest.view(header.torch_dtype).view(header.shape)


def test_overlapped_write_gives_the_sequential_bytes(tmp_path):
    t = big()
    path = str(tmp_path / "c.safetensors")
    n = write_file(path, t)
    data = open(path, "rb").read()
    assert n == len(data)
    assert data == cf.encode_bytes(t, KEY)
    assert same(cf.decode(data, KEY), t)


def test_unseekable_stream_falls_back_to_header_first(tmp_path):
    class Stream(io.RawIOBase):
        def __init__(self) -> None:
            self.buf = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            self.buf += bytes(b)
            return len(b)

    t = big(1)
    s = Stream()
    cf.write_chunk(s, t, KEY)
    assert bytes(s.buf) == cf.encode_bytes(t, KEY)


@pytest.mark.parametrize(
    "size",
    [
        100, cf.WHOLE_READ_BYTES, cf.WHOLE_READ_BYTES + 2, cf.OVERLAP_MIN_BYTES - 2, cf.OVERLAP_MIN_BYTES,
        cf.SPLIT_READ_MIN_BYTES - 2, cf.SPLIT_READ_MIN_BYTES, cf.SPLIT_READ_MIN_BYTES + 7 * cf.READ_PIECE_BYTES,
    ],
)  # fmt: skip
def test_verified_read_round_trips_every_size(tmp_path, size):
    t, path = stored(tmp_path, 2, size)
    assert same(read_file(path), t)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_verified_read_detects_a_flip_in_any_piece(tmp_path, where):
    t, path = stored(tmp_path, 3)
    size = os.path.getsize(path)
    offset = {"first": size - t.numel() * 2, "middle": size - t.numel(), "last": size - 1}[where]
    flip_bit(path, offset)
    with pytest.raises(CorruptChunkError, match="checksum"):
        read_file(path)


def test_verified_read_detects_truncation(tmp_path):
    t, path = stored(tmp_path, 4)
    with open(path, "rb", buffering=0) as f:
        header = cf.read_header(f)
    os.truncate(path, os.path.getsize(path) - cf.READ_PIECE_BYTES - 5)
    with open(path, "rb", buffering=0) as f:
        f.seek(header.data_offset)
        with pytest.raises(CorruptChunkError, match="truncated"):
            cf.read_payload_verified(f, header, torch.empty(header.nbytes, dtype=torch.uint8))


def test_failed_write_waits_for_the_helper_and_raises(tmp_path):
    class Failing(io.RawIOBase):
        def seekable(self) -> bool:
            return True

        def seek(self, pos: int, whence: int = 0) -> int:
            return pos

        def write(self, b) -> int:  # type: ignore[override]
            raise OSError(28, "no space")

    with pytest.raises(OSError):
        cf.write_chunk(Failing(), big(5), KEY)


# -- the split read: a helper reads pieces at offsets while the caller reads and hashes --


class Positional:
    """A plain file with ``preadinto`` (as disk_io's test files have) that records who read
    which piece, and can make one thread's first read fail or the helper's reads slow.

    With ``wait_for_helper`` the caller's first read waits until the helper has begun a
    read, so a test does not depend on how soon a thread gets a core."""

    def __init__(
        self, path: str, *, fail: str | None = None, helper_delay: float = 0.0, wait_for_helper: bool = True
    ) -> None:
        self.f = open(path, "rb", buffering=0)
        self.caller = threading.get_ident()
        self.fail = fail  # "caller" or "helper": that thread's first read fails
        self.failed_at: int | None = None
        self.helper_delay = helper_delay
        self.wait_for_helper = wait_for_helper
        self.helper_reading = threading.Event()
        self.readers: dict[int, int] = {}  # offset -> thread ident
        self.active = 0  # reads in progress
        self.lock = threading.Lock()

    def preadinto(self, buf, offset: int) -> int:
        me = threading.get_ident()
        mine = me == self.caller
        with self.lock:
            first = me not in self.readers.values()
            self.readers[offset] = me
            self.active += 1
        try:
            if mine and first and self.wait_for_helper:
                assert self.helper_reading.wait(10), "the helper never started"
            if not mine:
                self.helper_reading.set()
                time.sleep(self.helper_delay)
            if first and self.fail == ("caller" if mine else "helper"):
                self.failed_at = offset
                raise OSError(errno.EIO, "injected EIO")
            return os.preadv(self.f.fileno(), [buf], offset)
        finally:
            with self.lock:
                self.active -= 1

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def read_positional(path: str, reader: Positional, helper=None) -> torch.Tensor:
    with open(path, "rb", buffering=0) as f:
        header = cf.read_header(f)
    try:
        reader.f.seek(header.data_offset)
        dest = torch.empty(header.nbytes, dtype=torch.uint8)
        cf.read_payload_verified(reader, header, dest, helper=helper)
        assert reader.f.tell() == header.data_offset + header.nbytes  # left at the payload's end
    finally:
        reader.f.close()
    return dest.view(header.torch_dtype).view(header.shape)


def test_split_read_shares_the_pieces_with_the_helper(tmp_path):
    t, path = stored(tmp_path, 6)
    r = Positional(path)
    assert same(read_positional(path, r), t)
    assert len(set(r.readers.values())) == 2, "the helper thread read no piece"
    assert len(r.readers) == -(-t.numel() * 2 // cf.SPLIT_PIECE_BYTES)  # each piece read once


class RecordingState:
    """An xxh3-128 state that records which thread fed it how many bytes, in order."""

    def __init__(self) -> None:
        import xxhash

        self.state = xxhash.xxh3_128()
        self.feeds: list[tuple[int, int]] = []

    def update(self, piece) -> None:
        self.feeds.append((threading.get_ident(), len(piece)))
        self.state.update(piece)


def test_split_read_hashes_on_both_threads_in_order(tmp_path):
    """A piece landing while no other thread holds the hash token is hashed by the thread
    that read it: here each of the helper's reads takes 0.2 s, so the caller reads every
    piece but the one the helper sleeps on, hashes none past it, and is waiting (token
    free) when it lands (reading ~7 MiB takes it milliseconds); the helper then hashes
    its piece and every later one. The digest proves the order: any piece fed twice,
    skipped or out of place changes it."""
    t, path = stored(tmp_path, 14)
    with open(path, "rb", buffering=0) as f:
        header = cf.read_header(f)
    r = Positional(path, helper_delay=0.2)
    dest = torch.empty(header.nbytes, dtype=torch.uint8)
    state = RecordingState()
    helper = ThreadPoolExecutor(max_workers=1)
    try:
        cf._SplitRead(lambda buf, off: r.preadinto(buf, off), header.data_offset, cf._byte_view(dest)).run(
            state, helper
        )
    finally:
        helper.shutdown()
        r.f.close()
    assert "xxh3_128:" + state.state.hexdigest() == header.checksum
    assert sum(n for _, n in state.feeds) == header.nbytes
    assert all(n == cf.SPLIT_PIECE_BYTES for _, n in state.feeds[:-1])  # one feed per piece
    helpers = set(r.readers.values()) - {r.caller}
    assert len(helpers) == 1, "the helper read no piece"
    assert state.feeds[-1][0] in helpers, "the helper hashed no piece"
    assert same(dest.view(header.torch_dtype).view(header.shape), t)


@pytest.mark.parametrize("pool", ["busy", "shut down"])
def test_split_read_finishes_alone_when_the_helper_never_starts(tmp_path, pool):
    t, path = stored(tmp_path, 7)
    helper = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    if pool == "busy":
        helper.submit(release.wait)  # the helper's only thread is taken
    else:
        helper.shutdown()  # submit raises RuntimeError
    try:
        r = Positional(path, wait_for_helper=False)
        assert same(read_positional(path, r, helper=helper), t)
        assert set(r.readers.values()) == {r.caller}
    finally:
        release.set()
        helper.shutdown()


def test_a_failed_piece_is_raised_only_once_the_helper_let_go_of_dest(tmp_path):
    t, path = stored(tmp_path, 8)
    # The caller's first read fails while the helper is 50 ms into a read of its own:
    # without the wait, that read would still be writing into dest after the raise.
    r = Positional(path, fail="caller", helper_delay=0.05)
    with pytest.raises(OSError, match="injected EIO"):
        read_positional(path, r)
    assert r.active == 0, "a read was still writing into dest when the error was raised"
    assert r.readers[r.failed_at] == r.caller


def test_a_helpers_failed_piece_reaches_the_caller(tmp_path):
    t, path = stored(tmp_path, 8)
    r = Positional(path, fail="helper")
    with pytest.raises(OSError, match="injected EIO"):
        read_positional(path, r)
    assert r.failed_at is not None and r.readers[r.failed_at] != r.caller


def test_a_failed_split_read_lets_go_of_dest_without_gc(tmp_path):
    """The error must not keep the buffer it was reading into alive (a pool buffer
    would stay busy until the cycle collector ran)."""
    t, path = stored(tmp_path, 11)
    with open(path, "rb", buffering=0) as f:
        header = cf.read_header(f)
    os.truncate(path, os.path.getsize(path) - 2 * cf.READ_PIECE_BYTES)
    gc.disable()
    try:
        dest = torch.empty(header.nbytes, dtype=torch.uint8)
        ref = weakref.ref(dest)
        with open(path, "rb", buffering=0) as f:
            f.seek(header.data_offset)
            with pytest.raises(CorruptChunkError, match="truncated"):
                cf.read_payload_verified(f, header, dest)
        del dest
        assert ref() is None, "dest is still referenced after the failed read"
    finally:
        gc.enable()


def test_a_dest_larger_than_the_payload_reads_only_the_payload(tmp_path):
    t, path = stored(tmp_path, 12)
    with open(path, "rb", buffering=0) as f:
        header = cf.read_header(f, total_size=os.fstat(f.fileno()).st_size)
        dest = torch.zeros(header.nbytes + 64, dtype=torch.uint8)  # a pool buffer rounds up
        cf.read_payload_verified(f, header, dest)
    assert same(dest[: header.nbytes].view(header.torch_dtype).view(header.shape), t)
    assert int(dest[header.nbytes :].sum()) == 0


def test_split_read_detects_truncation_between_stat_and_read(tmp_path):
    t, path = stored(tmp_path, 9)
    with open(path, "rb", buffering=0) as f:
        header = cf.read_header(f, total_size=os.fstat(f.fileno()).st_size)
        os.truncate(path, os.path.getsize(path) - 2 * cf.READ_PIECE_BYTES)  # after the size check
        with pytest.raises(CorruptChunkError, match="truncated"):
            cf.read_payload_verified(f, header, torch.empty(header.nbytes, dtype=torch.uint8))


@pytest.mark.parametrize("damage", ["none", "flip", "truncate"])
def test_a_plain_stream_is_read_and_checked_in_order(tmp_path, damage):
    """A stream with no read-at-offset (a pipe, a buffered reader) takes the sequential path."""
    t, path = stored(tmp_path, 10)
    size = os.path.getsize(path)
    if damage == "flip":
        flip_bit(path, size - 10)
    elif damage == "truncate":
        os.truncate(path, size - cf.READ_PIECE_BYTES)
    with open(path, "rb") as f:  # an io.BufferedReader: no preadinto, not a FileIO
        assert cf._positional_reader(f) is None
        header = cf.read_header(f)
        dest = torch.empty(header.nbytes, dtype=torch.uint8)
        if damage == "none":
            cf.read_payload_verified(f, header, dest)
            assert same(dest.view(header.torch_dtype).view(header.shape), t)
        else:
            with pytest.raises(CorruptChunkError, match="checksum" if damage == "flip" else "truncated"):
                cf.read_payload_verified(f, header, dest)


def test_a_plain_stream_is_hashed_here_when_the_helper_pool_refuses(tmp_path):
    t, path = stored(tmp_path, 13)
    helper = ThreadPoolExecutor(max_workers=1)
    helper.shutdown()
    with open(path, "rb") as f:  # buffered: the sequential path, whose helper hashes
        header = cf.read_header(f)
        dest = torch.empty(header.nbytes, dtype=torch.uint8)
        cf.read_payload_verified(f, header, dest, helper=helper)
    assert same(dest.view(header.torch_dtype).view(header.shape), t)


@pytest.mark.parametrize("stored_key, unkeyed_ok, ok", [
    (KEY, False, True),
    ("", True, True),  # the seed's save_disk(path, kv_chunk) writes no key
    ("", False, False),
    ("vllm@m@1@0@" + "ef" * 32, True, False),  # another chunk's key is refused either way
])
def test_read_chunk_checks_identity_before_it_takes_a_buffer(tmp_path, stored_key, unkeyed_ok, ok):
    t = big(14, 1000)
    path = str(tmp_path / "c.safetensors")
    write_file(path, t, key=stored_key)
    taken: list[int] = []

    def acquire(n: int) -> torch.Tensor:
        taken.append(n)
        return torch.empty(n, dtype=torch.uint8)

    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if ok:
            got = cf.read_chunk(f, KEY, acquire, total_size=size, unkeyed_ok=unkeyed_ok)
            assert same(got, t) and taken == [t.numel() * 2]
        else:
            with pytest.raises(CorruptChunkError, match="key"):
                cf.read_chunk(f, KEY, acquire, total_size=size, unkeyed_ok=unkeyed_ok)
            assert taken == []
