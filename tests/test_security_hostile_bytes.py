"""Hostile bytes where a chunk should be, in every backend that stores bytes.

Promises: a truncated, bit-flipped, lying or foreign object is a miss (``None``),
never an exception and never a wrong tensor; lying headers are rejected before
any allocation sized by the header; nothing stored is ever unpickled (a planted
pickle's sentinel file never appears).

Objects are planted with the medium's own writer: a file at the chunk's path
for the disk tier, the backend's real connector (S3, Redis, fsspec) for remotes.
"""

from __future__ import annotations

import json
import pickle
import random
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch

from lmcache_core import chunk_format as cf
from lmcache_core.errors import CorruptChunkError
from lmcache_core.key import CacheEngineKey
from lmcache_core.layout import key_to_path
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend
from tests.conftest import make_key

Planter = Callable[[CacheEngineKey, bytes], None]
BIT_FLIP_SEEDS = 300
SLOW_NETWORK = ("s3",)  # every-offset sweeps sample these (each op is an HTTP round trip)


def planter_for(store: LMCBackendInterface) -> Planter | None:
    """A function that stores raw bytes where ``store`` looks for a key's chunk."""
    if isinstance(store, LMCLocalDiskBackend):

        def plant_file(key: CacheEngineKey, blob: bytes) -> None:
            path = Path(store.root) / key_to_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)

        return plant_file
    connector = getattr(store, "connector", None)
    if connector is not None:
        return lambda key, blob: connector.put(key, [blob])
    tiers = getattr(store, "_tiers", None)  # hybrid: plant in its disk tier, else its remote
    for _, tier in reversed(tiers or []):
        plant = planter_for(tier)
        if plant is not None:
            return plant
    remote = getattr(store, "remote", None)
    return planter_for(remote) if remote is not None else None


@pytest.fixture
def hostile(open_store, case):  # type: ignore[no-untyped-def]
    # Tests using this are marked HOSTILE_CASES: pipelined and cluster variants
    # decode through the same code as their plain case, so the sweeps run on one
    # of each medium to keep the default run short (the pickle test covers all).
    store = open_store()
    plant = planter_for(store)
    assert plant is not None, f"{case.name} stores bytes but no planter reaches them"
    return store, plant, case.name.split("-")[0] in SLOW_NETWORK


def small_chunk() -> torch.Tensor:
    return torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2)


def assert_miss_or_exact(store: LMCBackendInterface, key: CacheEngineKey, good: torch.Tensor | None) -> bool:
    """``get`` is None or exactly ``good``; returns whether it was a miss."""
    got = store.get(key)
    if got is None:
        return True
    assert good is not None and got.dtype == good.dtype and got.shape == good.shape
    assert torch.equal(got.cpu().view(torch.uint8), good.view(torch.uint8))
    return False


# -- truncation and bit flips ---------------------------------------------------------------------


HOSTILE_CASES = pytest.mark.cases(one_per_medium=True, bytes_only=True)


@HOSTILE_CASES
def test_every_truncation_offset_is_a_miss(hostile):
    store, plant, slow = hostile
    key = make_key("trunc")
    raw = cf.encode_bytes(small_chunk(), key.to_string())
    header_end = cf.header_length(raw[:8])
    cuts = range(len(raw))
    if slow:  # every header boundary, then a stride through the rest
        cuts = sorted({0, 1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(raw) - 1}
                      | set(range(0, len(raw), 17)))
    for cut in cuts:
        plant(key, raw[:cut])
        assert store.get(key) is None, f"cut at {cut} of {len(raw)}"
    plant(key, raw)  # and the whole file is fine: the sweep did not poison the key
    assert not assert_miss_or_exact(store, key, small_chunk())


@HOSTILE_CASES
def test_a_cut_or_padded_payload_has_no_header(hostile):
    """``read_header`` (the header-only check ``warm`` trusts a held copy by) sees
    the object's size, not just a header that parses: a remote's used to pass a
    copy cut anywhere after its header."""
    store, plant, _ = hostile
    key = make_key("cut-payload")
    raw = cf.encode_bytes(small_chunk(), key.to_string())
    header_end = cf.header_length(raw[:8])
    for blob in (raw[:header_end], raw[: header_end + 1], raw[:-1], raw + b"\0"):
        plant(key, blob)
        assert store.read_header(key) is None, f"{len(blob)} bytes of {len(raw)}"
    plant(key, raw)
    header = store.read_header(key)
    assert header is not None and header.total_size == len(raw) and header.key == key.to_string()


def _edited_header(raw: bytes, edit: Callable[[dict], None]) -> bytes:
    """``raw`` with its JSON header edited in place: same length, sizes consistent."""
    end = cf.header_length(raw[:8])
    doc = json.loads(raw[8:end])
    edit(doc)
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) <= end - 8
    return raw[:8] + body.ljust(end - 8) + raw[end:]


@HOSTILE_CASES
def test_a_header_that_reads_the_payload_as_another_tensor_is_a_miss(hostile):
    """Only the payload was checksummed: an F16 header rewritten to I16 (same item
    size), or a permuted shape, passed every check and came back as another tensor."""
    store, plant, _ = hostile
    key = make_key("meta")
    good = torch.randn(2, 2, 4, 2, 8, generator=torch.Generator().manual_seed(5)).half()
    raw = cf.encode_bytes(good, key.to_string())

    def as_int16(doc: dict) -> None:
        doc["kv_chunk"]["dtype"] = "I16"

    def permuted(doc: dict) -> None:
        doc["kv_chunk"]["shape"] = [2, 2, 2, 4, 8]

    for edit in (as_int16, permuted):
        blob = _edited_header(raw, edit)
        assert cf.parse_header(cf.encode_header(good, key.to_string())).meta_checksum  # new chunks carry one
        with pytest.raises(CorruptChunkError, match="header checksum"):
            cf.decode(blob)
        store.remove(key)
        plant(key, blob)
        assert store.get(key) is None, edit.__name__
    # A chunk written before the field existed is still read (the payload is still checked).
    def drop_field(doc: dict) -> None:
        del doc["__metadata__"]["lmcache.meta_checksum"]

    store.remove(key)
    plant(key, _edited_header(raw, drop_field))
    assert not assert_miss_or_exact(store, key, good)


@HOSTILE_CASES
def test_random_bit_flips_never_give_a_wrong_tensor(hostile):
    store, plant, slow = hostile
    key = make_key("flip")
    good = torch.randn(2, 2, 4, 2, 8, generator=torch.Generator().manual_seed(3)).half()
    raw = cf.encode_bytes(good, key.to_string())
    seeds = range(BIT_FLIP_SEEDS // (10 if slow else 1))
    misses = 0
    for seed in seeds:
        rng = random.Random(seed)
        blob = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            pos = rng.randrange(len(blob))
            blob[pos] ^= 1 << rng.randrange(8)
        # Removed first: a flip that changes nothing the reader relies on (the name of
        # the optional lmcache.meta_checksum field, say) is served exactly, and a
        # hybrid's memory tier would then answer every later seed from its fill.
        store.remove(key)
        plant(key, bytes(blob))
        misses += assert_miss_or_exact(store, key, good)
    assert misses >= len(seeds) * 0.9  # nearly every flip is caught, none is served wrong


# -- lying headers -----------------------------------------------------------------------------------


def _blob(header: object, payload: bytes = b"", length: int | None = None) -> bytes:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(body) if length is None else length) + body + payload


def _tensor(dtype: str, shape: list, offsets: list, key: str, checksum: str = "xxh3_128:0") -> dict:
    meta = {"lmcache.format": "1", "lmcache.key": key, "lmcache.checksum": checksum}
    return {"__metadata__": meta, "kv_chunk": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


def lying_headers(key: str) -> dict[str, bytes]:
    """Name -> blob. Each lies about sizes, types or structure."""
    ok = cf.encode_bytes(small_chunk(), key)
    return {
        "huge-header-length": struct.pack("<Q", 2**62) + ok[8:],
        "header-length-4GiB": struct.pack("<Q", 2**32) + ok[8:],
        "header-length-past-end": struct.pack("<Q", len(ok)) + ok[8:],
        "header-length-zero": struct.pack("<Q", 0) + ok[8:],
        "offsets-past-end": _blob(_tensor("F32", [16], [0, 2**40], key), b"x" * 64),
        "offsets-not-from-zero": _blob(_tensor("F32", [16], [8, 72], key), b"x" * 64),
        "offsets-negative": _blob(_tensor("F32", [16], [-64, 0], key), b"x" * 64),
        "shape-x-dtype-not-bytes": _blob(_tensor("F32", [1000, 1000], [0, 64], key), b"x" * 64),
        "shape-huge-claims-1TiB": _blob(_tensor("U8", [2**20, 2**20], [0, 2**40], key), b"x" * 64),
        "shape-product-overflows": _blob(_tensor("F64", [2**39] * 16, [0, 64], key), b"x" * 64),
        "shape-negative": _blob(_tensor("F32", [-4, -4], [0, 64], key), b"x" * 64),
        "shape-float": _blob(_tensor("F32", [16.0], [0, 64], key), b"x" * 64),
        "shape-bool": _blob(_tensor("U8", [True], [0, 1], key), b"x"),
        "shape-17-dims": _blob(_tensor("U8", [1] * 17, [0, 1], key), b"x"),
        "shape-not-list": _blob(_tensor("U8", "16", [0, 16], key), b"x" * 16),
        "unknown-dtype": _blob(_tensor("Q7", [16], [0, 16], key), b"x" * 16),
        "dtype-object": _blob(_tensor("O", [16], [0, 16], key), b"x" * 16),
        "json-list": _blob([1, 2, 3]),
        "json-string": _blob("kv_chunk"),
        "json-null": _blob(None),
        "json-number": _blob(12345),
        "json-nested-64k": _blob(b"[" * 30000 + b"]" * 30000),
        "json-nested-objects": _blob(b'{"a":' * 20000 + b"1" + b"}" * 20000),
        "json-huge-int": _blob(b'{"kv_chunk":{"shape":[' + b"9" * 60000 + b"]}}"),
        "json-nan": _blob(b'{"kv_chunk":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', b"x" * 4),
        "not-utf8": _blob(b"\xff\xfe" * 32),
        "metadata-not-strings": _blob({"__metadata__": {"lmcache.key": 5}, "kv_chunk": {}}),
        "two-tensors": _blob({"kv_chunk": {}, "other": {}}),
        "tensor-not-object": _blob({"kv_chunk": [1]}),
        "format-version-2": _blob(_tensor("U8", [4], [0, 4], key) | {"__metadata__": {
            "lmcache.format": "2", "lmcache.key": key, "lmcache.checksum": cf.checksum(b"abcd")}}, b"abcd"),
        "no-checksum": _blob({"__metadata__": {"lmcache.format": "1", "lmcache.key": key},
                              "kv_chunk": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"abcd"),
        "other-key": cf.encode_bytes(small_chunk(), key.replace("@0@", "@1@", 1).replace("@1@", "@2@", 1)),
        "foreign-safetensors": _foreign_safetensors(),
        "empty": b"",
        "eight-zero-bytes": b"\0" * 8,
    }


def _foreign_safetensors() -> bytes:
    from safetensors.torch import save

    return save({"kv_chunk": torch.ones(4)})


@HOSTILE_CASES
def test_lying_headers_rejected_before_any_large_allocation(hostile):
    store, plant, _ = hostile
    key = make_key("liar")
    acquired: list[int] = []
    pool = getattr(store, "_pool", None)
    if isinstance(store, LMCLocalDiskBackend) and pool is not None:
        real_acquire = pool.acquire

        def recording_acquire(nbytes: int) -> torch.Tensor:  # a spy: the real pool still allocates
            acquired.append(nbytes)
            return real_acquire(nbytes)

        pool.acquire = recording_acquire  # type: ignore[method-assign]
    for name, blob in lying_headers(key.to_string()).items():
        plant(key, blob)
        assert store.get(key) is None, name
        store.read_header(key)  # header-only: may describe the lie (it allocates nothing), never raises
        assert all(n <= len(blob) for n in acquired), (name, acquired)
    plant(key, cf.encode_bytes(small_chunk(), key.to_string()))
    assert not assert_miss_or_exact(store, key, small_chunk())


@pytest.mark.parametrize("name", sorted(lying_headers("vllm@m@1@0@ab")), ids=str)
def test_codec_rejects_lying_header_with_bounded_memory(name):
    """At the codec level: CorruptChunkError, never another exception, little memory."""
    import tracemalloc

    blob = lying_headers("vllm@m@1@0@ab")[name]
    tracemalloc.start()
    try:
        with pytest.raises(CorruptChunkError):
            cf.decode(blob, "vllm@m@1@0@ab")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(blob) + (1 << 20), f"{name}: peak {peak} bytes"


def test_regression_deeply_nested_header_raised_recursion_error(tmp_path):
    """Bug: a header of 30 000 nested brackets made json raise RecursionError, which
    escaped the codec (not a CorruptChunkError) and made the disk tier's get() raise."""
    blob = _blob(b"[" * 30000 + b"]" * 30000)
    with pytest.raises(CorruptChunkError):
        cf.decode(blob)
    from lmcache_core import LMCacheEngineConfig

    store = LMCLocalDiskBackend(
        LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path)), None, "cpu"
    )
    planter_for(store)(make_key(1), blob)  # type: ignore[misc]
    assert store.get(make_key(1)) is None
    assert store.stats["corrupt"] == 1
    store.close()


# -- never unpickle ------------------------------------------------------------------------------------


class Detonator:
    """Unpickling this creates ``sentinel`` (what an attacker's payload would do)."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.sentinel, "w"))


def pickle_payloads(sentinel: Path, key: str) -> dict[str, bytes]:
    """Every way a pickle could be planted where a chunk should be."""
    import io

    raw = pickle.dumps(Detonator(str(sentinel)), protocol=2)
    buf = io.BytesIO()
    torch.save({"kv_chunk": Detonator(str(sentinel))}, buf)
    payload = raw + b"\0" * (-len(raw) % 8)
    # A well-formed chunk whose payload bytes are a pickle, checksum and all: data, never code.
    meta = {"lmcache.format": "1", "lmcache.key": key, "lmcache.checksum": cf.checksum(payload)}
    wrapped = _blob({"__metadata__": meta, "kv_chunk": {"dtype": "U8", "shape": [len(payload)],
                                                       "data_offsets": [0, len(payload)]}}, payload)
    return {
        "pickle-proto2": raw,
        "pickle-proto5": pickle.dumps(Detonator(str(sentinel)), protocol=5),
        "torch-save-zip": buf.getvalue(),
        "pickle-after-valid-length": struct.pack("<Q", len(raw)) + raw,
        "pickle-inside-valid-chunk": wrapped,
    }


@pytest.mark.cases(bytes_only=True)
def test_planted_pickle_never_executes(open_store, case, tmp_path):
    store = open_store()
    plant = planter_for(store)
    assert plant is not None, f"{case.name} stores bytes but no planter reaches them"
    sentinel = tmp_path / "PWNED"
    key = make_key("pickle")
    for name, blob in pickle_payloads(sentinel, key.to_string()).items():
        plant(key, blob)
        got = store.get(key)
        if name == "pickle-inside-valid-chunk":
            assert got is None or got.dtype == torch.uint8  # bytes come back as bytes
        else:
            assert got is None, name
        store.read_header(key)
        store.contains(key)
        try:
            store.list()
        except NotImplementedError:
            pass
        store.batched_get([key, make_key("absent")])
        assert not sentinel.exists(), name


# -- things that are not files where a chunk should be (disk tier) -----------------------------------


def _disk_store(tmp_path: Path) -> LMCLocalDiskBackend:
    from lmcache_core import LMCacheEngineConfig

    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path / "store"))
    return LMCLocalDiskBackend(cfg, None, "cpu")


def test_regression_fifo_at_a_chunk_path_hung_get(tmp_path):
    """Bug: open() of a FIFO planted at a chunk path blocked forever, hanging get()."""
    import os
    import threading

    store = _disk_store(tmp_path)
    path = Path(store.root) / key_to_path(make_key(1))
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    results: list[object] = []
    reader = threading.Thread(
        target=lambda: results.extend([store.get(make_key(1)), store.read_header(make_key(1))]), daemon=True
    )
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "get() blocked on a FIFO"
    assert results == [None, None]
    assert make_key(1) not in store.list()  # listings skip non-files
    store.put(make_key(1), small_chunk())  # the atomic rename replaces it
    assert torch.equal(store.get(make_key(1)), small_chunk())
    store.close()


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "/dev/null", "dir", "dangling"])
def test_non_files_at_a_chunk_path_are_misses(tmp_path, target):
    import os

    store = _disk_store(tmp_path)
    path = Path(store.root) / key_to_path(make_key(2))
    path.parent.mkdir(parents=True)
    if target == "dir":
        path.mkdir()
    elif target == "dangling":
        os.symlink(tmp_path / "nowhere", path)
    else:
        os.symlink(target, path)
    assert store.get(make_key(2)) is None
    assert store.read_header(make_key(2)) is None
    assert store.batched_get([make_key(2), make_key(3)]) == [None, None]
    store.close()
