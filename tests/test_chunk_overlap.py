"""The overlapped checksum paths of the chunk format (large payloads).

``write_chunk`` hashes on a helper thread while it writes, then writes the
header last; ``read_payload_verified`` hashes each piece right after reading it.
Both must produce and accept exactly the bytes of the plain, sequential format.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from lmcache_core import chunk_format as cf
from lmcache_core.errors import CorruptChunkError

KEY = "vllm@m@1@0@" + "cd" * 32


def big(seed: int = 0, nbytes: int = cf.OVERLAP_MIN_BYTES + 3 * cf.READ_PIECE_BYTES + 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**15), 2**15, (nbytes // 2,), generator=g, dtype=torch.int16).view(torch.float16)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bit patterns include NaNs, which ``==`` never matches)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def write_file(path: str, t: torch.Tensor, key: str = KEY) -> int:
    with open(path, "wb", buffering=0) as f:
        return cf.write_chunk(f, t, key)


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
    "size", [100, cf.OVERLAP_MIN_BYTES - 2, cf.OVERLAP_MIN_BYTES, cf.OVERLAP_MIN_BYTES + 7 * cf.READ_PIECE_BYTES]
)
def test_verified_read_round_trips_every_size(tmp_path, size):
    t = big(2, size)
    path = str(tmp_path / "c.safetensors")
    write_file(path, t)
    assert same(read_file(path), t)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_verified_read_detects_a_flip_in_any_piece(tmp_path, where):
    t = big(3)
    path = str(tmp_path / "c.safetensors")
    write_file(path, t)
    size = os.path.getsize(path)
    offset = {"first": size - t.numel() * 2, "middle": size - t.numel(), "last": size - 1}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CorruptChunkError, match="checksum"):
        read_file(path)


def test_verified_read_detects_truncation(tmp_path):
    t = big(4)
    path = str(tmp_path / "c.safetensors")
    write_file(path, t)
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
