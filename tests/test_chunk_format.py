"""Chunk format: safetensors compatibility, validation before allocation, checksums."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load

from lmcache_core import chunk_format as cf
from lmcache_core.errors import CorruptChunkError

KEY = "vllm@m@1@0@" + "ab" * 32


def sample(dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(2, 2, 8, 2, 4).to(dtype)


def test_round_trip_and_safetensors_library_reads_it():
    t = sample()
    raw = cf.encode_bytes(t, KEY)
    assert torch.equal(cf.decode(raw, KEY), t)
    loaded = st_load(raw)
    assert list(loaded) == ["kv_chunk"] and torch.equal(loaded["kv_chunk"], t)


def test_header_alone_answers_listing_questions():
    t = sample(torch.float16)
    raw = cf.encode_bytes(t, KEY)
    n = cf.header_length(raw[:8])
    h = cf.parse_header(raw[:n])
    assert h.key == KEY and h.dtype == "F16" and h.shape == tuple(t.shape)
    assert h.nbytes == t.numel() * 2 and h.total_size == len(raw)
    assert h.checksum.startswith("xxh3_128:") and h.data_offset % 64 == 0


def test_checksum_mismatch_is_corrupt():
    raw = bytearray(cf.encode_bytes(sample(), KEY))
    raw[-1] ^= 0x01
    with pytest.raises(CorruptChunkError, match="checksum"):
        cf.decode(bytes(raw), KEY)


def test_wrong_key_is_corrupt():
    raw = cf.encode_bytes(sample(), KEY)
    with pytest.raises(CorruptChunkError, match="expected"):
        cf.decode(raw, KEY.replace("ab", "cd"))


def _with_header(header: object, payload: bytes = b"", raw_len: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", raw_len if raw_len is not None else len(body)) + body + payload


@pytest.mark.parametrize(
    "blob, reason",
    [
        (b"", "truncated"),
        (struct.pack("<Q", 2**62) + b"{}", "header length"),
        (_with_header([1, 2]), "not a JSON object"),
        (_with_header({"kv_chunk": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"x"), "unknown dtype"),
        (_with_header({"kv_chunk": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"x" * 8), "data_offsets"),
        (_with_header({"kv_chunk": {"dtype": "F32", "shape": [2**39, 2**39], "data_offsets": [0, 8]}}), "data_offsets"),
        (_with_header({"kv_chunk": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"xx"), "size"),
        (_with_header({"a": {}, "b": {}}), "exactly one tensor"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "not JSON"),
    ],
)
def test_lying_headers_are_rejected(blob, reason):
    with pytest.raises(CorruptChunkError, match=reason):
        cf.decode(blob)


def test_foreign_safetensors_without_our_metadata_is_refused():
    from safetensors.torch import save

    raw = save({"kv_chunk": torch.ones(4)})
    with pytest.raises(CorruptChunkError, match="not an lmcache chunk"):
        cf.decode(raw)


def test_every_truncation_is_detected():
    raw = cf.encode_bytes(torch.arange(16, dtype=torch.float32), KEY)
    for cut in range(len(raw)):
        with pytest.raises(CorruptChunkError):
            cf.decode(raw[:cut], KEY)


def test_decode_is_zero_copy_over_bytearray():
    raw = bytearray(cf.encode_bytes(torch.arange(8, dtype=torch.int64), KEY))
    t = cf.decode(raw, KEY)
    assert t.untyped_storage().data_ptr() == torch.frombuffer(raw, dtype=torch.uint8).data_ptr() + cf.header_length(raw[:8])


def test_unsupported_dtype_is_value_error():
    with pytest.raises(ValueError, match="cannot be stored"):
        cf.encode_bytes(torch.zeros(2, dtype=torch.complex64), KEY)


def test_parsed_headers_are_memoised_but_sizes_are_checked_every_time():
    t = sample()
    header = cf.encode_header(t, KEY)
    assert len(header) % 64 == 0  # payload starts 64-byte aligned
    total = len(header) + t.numel() * t.element_size()
    a = cf.parse_header(header, total_size=total)
    b = cf.parse_header(header + b"\0" * 5, total_size=total)
    assert a is b  # same bytes, parsed once
    with pytest.raises(CorruptChunkError, match="does not match"):
        cf.parse_header(header, total_size=total - 1)  # the cached header still meets the size check
    big_key = "vllm@" + "m" * 3000 + "@1@0@" + "ab" * 32
    big = cf.encode_header(t, big_key)
    assert len(big) > cf._MEMO_HEADER_BYTES
    assert cf.parse_header(big) is not cf.parse_header(big)  # large headers are not retained
    bad = struct.pack("<Q", 16) + b"{not json}      "
    for _ in range(2):  # a failure is not cached as a success
        with pytest.raises(CorruptChunkError):
            cf.parse_header(bad)


def _arrive(blob: bytes, steps: list[int]) -> tuple[cf.ArrivingPayload, memoryview]:
    """Feed ``blob`` into a buffer in the given increments, as a socket read would."""
    buf = memoryview(bytearray(len(blob) + 2))  # room for a reply's CRLF, as Redis replies have
    payload = cf.ArrivingPayload()
    payload.start(buf)
    got = 0
    for step in steps:
        step = min(step, len(blob) - got)
        buf[got : got + step] = blob[got : got + step]
        got += step
        payload.arrived(got)
    value = buf[: len(blob)]
    payload.finish(value)
    return payload, value


@pytest.mark.parametrize(
    "steps", [[3, 5, 200, 70_000], [1] * 20 + [10**7], [10**7]], ids=["uneven", "bytewise-header", "whole"]
)
def test_a_payload_hashed_as_it_arrives_matches_the_header_checksum(steps: list[int]) -> None:
    t = torch.randn(4, 2, 64, 8, 16).to(torch.bfloat16)
    blob = cf.encode_bytes(t, "k")
    payload, value = _arrive(blob, steps * (len(blob) // sum(steps) + 1))
    header = cf.parse_header(blob)
    assert payload.digest(value) == header.checksum
    out = cf.decode(value, "k", digest=payload.digest(value))
    assert torch.equal(out, t)


def test_an_arriving_payload_gives_no_digest_unless_whole_and_the_same_buffer() -> None:
    blob = cf.encode_bytes(sample(), "k")
    half, value = _arrive(blob, [len(blob) // 2])
    assert half.digest(value) is None  # not all of it arrived
    whole, value = _arrive(blob, [len(blob)])
    assert whole.digest(bytes(value)) is None  # not the object the reader returned
    assert whole.digest(memoryview(bytearray(blob))) is None
    assert whole.digest(value[:-1]) is None
    assert whole.digest(value[1:]) is None  # same buffer, same exporter, not the chunk
    bad, value = _arrive(b"\xff" * 8 + blob[8:], [len(blob)])  # a header length out of bounds
    assert bad.digest(value) is None
    cut_header, value = _arrive(blob[:20], [20])  # the header never completes
    assert cut_header.digest(value) is None


def test_decode_trusts_a_matching_digest_and_checks_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    t = sample()
    blob = cf.encode_bytes(t, "k")
    header = cf.parse_header(blob)
    calls = []
    real = cf.verify_payload
    monkeypatch.setattr(cf, "verify_payload", lambda h, p: (calls.append(1), real(h, p)))
    assert torch.equal(cf.decode(blob, "k", digest=header.checksum), t)
    assert calls == []  # the payload was not hashed a second time
    assert torch.equal(cf.decode(blob, "k", digest="xxh3_128:" + "0" * 32), t)  # a wrong digest: checked
    assert calls == [1]
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(CorruptChunkError, match="checksum"):
        cf.decode(damaged, "k", digest="xxh3_128:" + "0" * 32)


def test_a_header_whose_dtype_is_not_a_string_is_corrupt() -> None:
    # It raised TypeError (a list is unhashable); the Redis read path's side of it is
    # test_redis_connector.py's hostile large values.
    blob = _with_header({"kv_chunk": {"dtype": [], "shape": [1], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(CorruptChunkError, match="dtype"):
        cf.decode(blob)
    with pytest.raises(CorruptChunkError, match="dtype"):
        cf.parse_header(blob)


# A key that spells the checksum field: json.dumps escapes its quotes, so the offset
# search cannot land inside it (the key comes before the checksum in the header).
_TRICKY_KEY = 'vllm@m"lmcache.checksum":"xxh3_128:' + "1" * 32 + '"@1@0@abc'


@pytest.mark.parametrize("shape", [(3, 5, 7), (0,), (64, 1024)])
def test_an_unsealed_chunk_seals_to_the_very_header_encode_writes(shape: tuple[int, ...]) -> None:
    t = torch.randn(shape)
    u = cf.UnsealedChunk(t, _TRICKY_KEY)
    at = u.checksum_offset
    assert u.header[at : at + 32] == b"0" * 32
    assert len(u.header) == len(cf.encode_header(t, _TRICKY_KEY))
    assert u.size == len(u.header) + t.numel() * 4
    pieces = list(u.pieces(1000))
    assert all(len(p) <= 1000 for p in pieces) and b"".join(pieces) == bytes(cf.payload_view(t))
    assert u.sealed_header() == cf.encode_header(t, _TRICKY_KEY)
    header, payload = u.sealed_header(), u.payload
    assert torch.equal(cf.decode(header + bytes(payload), _TRICKY_KEY), t)


def test_an_unsealed_chunk_digest_comes_only_from_a_whole_pass() -> None:
    t = torch.randn(4, 1000)
    want = cf.encode_header(t, "k")
    # A pass cut short (a send that failed) leaves no digest: sealing hashes it all.
    u = cf.UnsealedChunk(t, "k")
    it = u.pieces(512)
    next(it), next(it)
    assert u._digest is None
    assert u.sealed_header() == want
    # A pass after a cut one starts over rather than hashing on from where it stopped.
    u = cf.UnsealedChunk(t, "k")
    it = u.pieces(512)
    next(it), next(it), next(it)
    assert b"".join(u.pieces(512)) == bytes(u.payload)
    assert u._digest is not None and u.sealed_header() == want
    with pytest.raises(ValueError):
        next(u.pieces(0))


def test_a_chunk_abandoned_while_it_is_hashed_is_never_sealed(monkeypatch):
    """The mark is read after the hash: a caller that gives up mid-hash may already be
    changing bytes the hash has not reached yet, so that hash must never be published."""
    t = torch.arange(4096, dtype=torch.float32)
    u = cf.UnsealedChunk(t, _TRICKY_KEY)
    assert u.sealed_header_unless_abandoned() == cf.encode_header(t, _TRICKY_KEY)
    u = cf.UnsealedChunk(t, _TRICKY_KEY)
    real = cf.xxhash.xxh3_128_hexdigest

    def hash_then_abandon(data):  # the caller times out while the hash runs
        digest = real(data)
        u.abandon()
        return digest

    monkeypatch.setattr(cf.xxhash, "xxh3_128_hexdigest", hash_then_abandon)
    assert u.sealed_header_unless_abandoned() is None


def test_an_empty_payload_is_read_and_verified() -> None:
    import io

    import torch

    from lmcache_core import chunk_format

    data = chunk_format.encode_bytes(torch.empty(0, 4), "vllm@m@1@0@" + "0" * 64)
    f = io.BytesIO(data)
    header = chunk_format.read_header(f, total_size=len(data))
    assert header.nbytes == 0
    chunk_format.read_payload_verified(f, header, torch.empty(0, dtype=torch.uint8))  # no error


def test_decode_of_bytes_copies_the_payload_without_a_warning_and_of_a_bytearray_aliases_it():
    """A tensor over ``bytes`` made torch warn "not writable" into a serving process's log,
    and writing to it changed an immutable object."""
    import warnings

    t = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2)
    raw = cf.encode_bytes(t, "k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cf.decode(raw, "k")
    got.fill_(-1)
    assert raw == cf.encode_bytes(t, "k")  # the bytes did not change
    writable = bytearray(raw)
    aliased = cf.decode(writable, "k")
    aliased.fill_(-1)
    assert writable != bytearray(raw)  # zero-copy over writable memory
