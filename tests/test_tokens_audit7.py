"""Regressions from the seventh audit of the token-level layer (``tokens.py``, ``key.py``
and how ``store_ops`` uses them), each named after what it proves.

Real stores only: memory, disk directories, a hybrid of both, and a private
``redis-server`` for the remote-down cases.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lmcache_core import CacheEngineKey, LMCacheEngineConfig, LMCacheEngineMetadata, chunk_hashes, layout
from lmcache_core.storage_backend import CreateStorageBackend, open_backend
from lmcache_core.storage_backend.local_backend import LMCLocalBackend
from lmcache_core.tokens import ChunkedKVStore
from tests.test_key import independent_chain

CHUNK = 16


def kv_for(n_tokens: int, fmt: str = "vllm", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 2, n_tokens, 3, 4) if fmt == "vllm" else (2, 2, 3, n_tokens, 4)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def narrow(kv: torch.Tensor, fmt: str, n: int) -> torch.Tensor:
    return kv.narrow(2 if fmt == "vllm" else 3, 0, n)




def hybrid(tmp_path, name: str = "disk"):  # type: ignore[no-untyped-def]
    cfg = LMCacheEngineConfig.from_defaults(
        local_device="cpu", local_disk=str(tmp_path / name), max_local_cache_size=0.01
    )
    return CreateStorageBackend(cfg, LMCacheEngineMetadata("m"), "cpu")


def open_kind(kind: str, tmp_path):  # type: ignore[no-untyped-def]
    if kind == "memory":
        return open_backend("cpu://")
    if kind == "disk":
        return open_backend(str(tmp_path / "disk"))
    return hybrid(tmp_path)


# -- retrieve hands out KV of its own ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "hybrid"])
@pytest.mark.parametrize("fmt", ["vllm", "huggingface"])
@pytest.mark.parametrize("n", [CHUNK, 10], ids=["one-full-chunk", "one-partial-chunk"])
def test_writing_into_a_one_chunk_retrieve_leaves_the_cached_chunk_alone(tmp_path, kind, fmt, n):
    """A one-chunk prefix was returned as the memory tier's get gave it (zero-copy, a
    view of the cache), while a longer one was joined into new memory: a caller that
    changed its KV in place (rotary fix-up, reused buffer) rewrote the cached chunk for
    every later prompt with that prefix, but only for prompts of <= chunk_size tokens."""
    tokens = list(range(500, 500 + n))
    kv = kv_for(n, fmt)
    backend = open_kind(kind, tmp_path)
    try:
        store = ChunkedKVStore(backend, "org/m", fmt=fmt, chunk_size=CHUNK)
        store.store(tokens, kv)
        got, covered = store.retrieve(tokens)
        assert covered == n and got is not None and torch.equal(got, kv)
        got.fill_(7)
        again, covered = store.retrieve(tokens)
        assert covered == n and again is not None and torch.equal(again, kv)
        assert again.untyped_storage().data_ptr() != got.untyped_storage().data_ptr()
    finally:
        backend.close()


# -- store(blocking=False) does not keep the caller's tensor -------------------------------------


class RecordingMemoryBackend(LMCLocalBackend):
    """The real memory tier, remembering each tensor its put was handed."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.handed: list[torch.Tensor] = []

    def put(self, key: CacheEngineKey, kv_chunk: torch.Tensor, blocking: bool = True) -> None:
        self.handed.append(kv_chunk)
        super().put(key, kv_chunk, blocking=blocking)


@pytest.mark.parametrize("fmt", ["vllm", "huggingface"])
@pytest.mark.parametrize("n", [CHUNK, 10, 3 * CHUNK + 2], ids=["one-full-chunk", "one-partial-chunk", "four-chunks"])
def test_a_nonblocking_store_leaves_the_callers_kv_free_to_reuse(fmt, n):
    """A queued put holds the tensor it was given until a worker writes it. The pieces
    of a longer prompt were copies, but a one-chunk prompt's piece was ``kv`` itself:
    an engine that reused its KV buffer right after ``store(..., blocking=False)``
    returned had the new contents cached under the old prompt's key."""
    tokens = list(range(900, 900 + n))
    kv = kv_for(n, fmt, seed=3)
    truth = kv.clone()
    cfg = LMCacheEngineConfig.from_defaults(local_device="cpu", max_local_cache_size=0.01)
    backend = RecordingMemoryBackend(cfg, LMCacheEngineMetadata("org/m"), dst_device="cpu")
    try:
        store = ChunkedKVStore(backend, "org/m", fmt=fmt, chunk_size=CHUNK)
        result = store.store(tokens, kv, blocking=False)
        kv.zero_()  # the caller's buffer, reused at once
        assert result.stored == -(-n // CHUNK) == len(backend.handed)
        # Deterministic: no queued tensor is a view of the caller's memory...
        base = kv.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() != base for t in backend.handed)
        # ...and so what is read back is what was stored, whenever the worker ran.
        got, covered = store.retrieve(tokens)
        assert covered == n and got is not None and torch.equal(got, truth)
    finally:
        backend.close()
    assert not torch.equal(truth, kv)  # the test really changed the caller's tensor


def test_a_blocking_store_of_one_chunk_is_copied_in(tmp_path):
    """The blocking put copies before it returns: no extra copy was needed there."""
    kv = kv_for(CHUNK)
    truth = kv.clone()
    with open_backend("cpu://") as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        store.store(list(range(CHUNK)), kv)
        kv.zero_()
        got, covered = store.retrieve(list(range(CHUNK)))
        assert covered == CHUNK and torch.equal(got, truth)


# -- token ids: dtypes, ranges ----------------------------------------------------------------


def test_every_integer_dtype_gives_the_same_keys_and_the_same_cache_hits(tmp_path):
    tokens = [0, 1, 127, 5, 99, 42, 7, 3] * 5  # 40 ids, all small enough for every dtype
    expected = independent_chain(tokens, CHUNK)
    forms = [tokens, tuple(tokens)]
    forms += [np.array(tokens, dtype=dt) for dt in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", ">i4", ">i8")]
    forms += [torch.tensor(tokens, dtype=dt) for dt in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)]
    forms.append(torch.tensor([tokens, tokens]).T[:, 0])  # not contiguous
    for form in forms:
        assert chunk_hashes(form, CHUNK) == expected, getattr(form, "dtype", type(form))
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        store.store(np.array(tokens, dtype=np.int32), kv_for(40))
        assert store.lookup(torch.tensor(tokens, dtype=torch.int64)).tokens == 40
        got, covered = store.retrieve(tokens)
        assert covered == 40 and torch.equal(got, kv_for(40))


def test_negative_and_extreme_int64_token_ids_hash_as_the_design_says():
    tokens = [-1, -(2**63), 2**63 - 1, 0, -5]
    assert chunk_hashes(tokens, 2) == independent_chain(tokens, 2)
    assert chunk_hashes(np.array(tokens, dtype=np.int64), 2) == independent_chain(tokens, 2)


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param([2**63], id="list-2**63"),
        pytest.param([2**64 - 1], id="list-2**64-1"),
        pytest.param(np.array([2**63, 1], dtype=np.uint64), id="numpy-uint64"),
        pytest.param(torch.from_numpy(np.array([1, 2**63], dtype=np.uint64)), id="torch-uint64"),
    ],
)
def test_token_ids_beyond_int64_are_refused_not_wrapped(ids):
    """The int64 cast wrapped them: token 2**63 hashed exactly as -2**63 (and 2**64-1 as
    -1), so two different prompts shared every key and one was served the other's KV.
    ``lmcache put --tokens`` refused such ids in JSON, but a ``.npy`` of uint64 and the
    library took them. In-range ids (uint64 included) hash as before."""
    with pytest.raises(ValueError, match="int64"):
        chunk_hashes(ids, 2)
    assert chunk_hashes(np.array([2**63 - 1, 3], dtype=np.uint64), 2) == independent_chain([2**63 - 1, 3], 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.complex64])
def test_non_integer_token_tensors_are_a_value_error(dtype):
    """A bf16 (or fp8) tensor of token ids raised numpy's bare ``TypeError: Got
    unsupported ScalarType BFloat16`` instead of naming the argument."""
    ids = torch.tensor([1.0, 2.0]).to(dtype)
    with pytest.raises(ValueError, match="token_ids: expected integers"):
        chunk_hashes(ids, 2)


def test_an_invalid_chunk_size_is_refused_when_the_store_is_made(tmp_path):
    with open_backend(str(tmp_path)) as backend:
        for bad in (0, -16, True, 16.0, "16"):
            with pytest.raises(ValueError, match="chunk_size"):
                ChunkedKVStore(backend, "m", chunk_size=bad)  # type: ignore[arg-type]


# -- prefix semantics --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["vllm", "huggingface"])
def test_partial_last_chunk_serves_only_its_own_prompt(tmp_path, fmt):
    """The last partial chunk is stored under the hash of its own tokens: a longer prompt
    (or one that ends elsewhere in that chunk) matches the full chunks only."""
    tokens = list(range(2 * CHUNK + 5))
    kv = kv_for(len(tokens), fmt)
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", fmt=fmt, chunk_size=CHUNK)
        assert store.store(tokens, kv).chunks == 3
        for query, want in [
            (tokens, len(tokens)),
            (tokens + [1, 2, 3], 2 * CHUNK),
            (tokens[:-1], 2 * CHUNK),
            (tokens[:CHUNK], CHUNK),  # exactly one chunk
            (tokens[: CHUNK - 1], 0),
            ([], 0),
        ]:
            assert store.lookup(query).tokens == want
            got, covered = store.retrieve(query)
            assert covered == want
            assert (got is None) if want == 0 else torch.equal(got, narrow(kv, fmt, want))


def test_another_chunk_size_never_serves_mis_sized_kv(tmp_path):
    """Keys name exact token prefixes: a store made with chunk_size 16 serves a reader
    using 32 only where the key covers the same tokens (a prompt shorter than both)."""
    tokens = list(range(3 * CHUNK))
    kv = kv_for(len(tokens))
    with open_backend(str(tmp_path)) as backend:
        ChunkedKVStore(backend, "m", chunk_size=CHUNK).store(tokens, kv)
        wide = ChunkedKVStore(backend, "m", chunk_size=2 * CHUNK)
        assert wide.lookup(tokens).tokens == 0 and wide.retrieve(tokens) == (None, 0)
        got, covered = wide.retrieve(tokens[:CHUNK])  # one key: hash of the same 16 tokens
        assert covered == CHUNK and torch.equal(got, kv[:, :, :CHUNK])


@pytest.mark.parametrize("fmt", ["vllm", "huggingface"])
@pytest.mark.parametrize("damage", ["flip", "empty", "removed"])
def test_a_bad_middle_chunk_ends_the_prefix_on_the_right_axis(tmp_path, fmt, damage):
    """Chunk 1 of 4 damaged on disk: retrieve (and ``get --tokens``) give chunk 0 only,
    never chunks 0, 2, 3 joined over the hole."""
    from lmcache_core.store_ops import Store, read_prefix

    tokens = list(range(4 * CHUNK))
    kv = kv_for(len(tokens), fmt)
    root = tmp_path / "store"
    with open_backend(str(root)) as backend:
        store = ChunkedKVStore(backend, "org/m", fmt=fmt, chunk_size=CHUNK)
        store.store(tokens, kv)
        path = layout.disk_path(str(root), store.keys_for(tokens)[1])
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[-3] ^= 0xFF
        open(path, "wb").write(bytes(data))
    elif damage == "empty":
        open(path, "wb").close()
    else:
        import os

        os.remove(path)
    with Store(str(root)) as tool:
        read = read_prefix(tool, np.array(tokens), model="org/m", fmt=fmt, chunk_size=CHUNK)
        assert read.tokens == CHUNK and torch.equal(read.joined(), narrow(kv, fmt, CHUNK))
    with open_backend(str(root)) as backend:
        store = ChunkedKVStore(backend, "org/m", fmt=fmt, chunk_size=CHUNK)
        got, covered = store.retrieve(tokens)
        assert covered == CHUNK and torch.equal(got, narrow(kv, fmt, CHUNK))
        assert store.lookup(tokens).tokens == CHUNK  # the bad chunk was found and dropped


# -- isolation: ranks, formats, model names ----------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_ranks_formats_and_similar_model_names_never_share_chunks(tmp_path, kind):
    tokens = list(range(2 * CHUNK))
    backend = open_kind(kind, tmp_path)
    try:
        owner = ChunkedKVStore(backend, "org/m", chunk_size=CHUNK, world_size=2, worker_id=0)
        owner.store(tokens, kv_for(len(tokens)))
        others = [
            ChunkedKVStore(backend, "org/m", chunk_size=CHUNK, world_size=2, worker_id=1),
            ChunkedKVStore(backend, "org/m", chunk_size=CHUNK, world_size=1, worker_id=0),
            ChunkedKVStore(backend, "org/m", chunk_size=CHUNK, world_size=4, worker_id=0),
            ChunkedKVStore(backend, "org/m", fmt="huggingface", chunk_size=CHUNK, world_size=2, worker_id=0),
            ChunkedKVStore(backend, "org%2Fm", chunk_size=CHUNK, world_size=2, worker_id=0),
            ChunkedKVStore(backend, "org_m", chunk_size=CHUNK, world_size=2, worker_id=0),
            ChunkedKVStore(backend, "org/m/", chunk_size=CHUNK, world_size=2, worker_id=0),
            ChunkedKVStore(backend, "Org/M", chunk_size=CHUNK, world_size=2, worker_id=0),
        ]
        for other in others:
            assert other.lookup(tokens).tokens == 0 and other.retrieve(tokens) == (None, 0)
        assert owner.retrieve(tokens)[1] == 2 * CHUNK
        assert {k.model_name for k in backend.list()} == {"org/m"}
    finally:
        backend.close()


# -- concurrency -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "disk", "hybrid"])
def test_overlapping_stores_racing_readers_only_ever_give_a_true_prefix(tmp_path, kind):
    """Four threads store prefixes of one prompt (blocking and not) while three look
    up and retrieve: every answer is a leading part of the true KV, whole chunks or
    the whole prompt, and nothing raises."""
    import random

    n = 10 * CHUNK + 3
    truth = kv_for(n, seed=11)
    tokens = list(range(7000, 7000 + n))
    backend = open_kind(kind, tmp_path)
    store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
    problems: list[object] = []
    done = threading.Event()

    def writer(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(15):
                m = r.randint(1, n)
                store.store(tokens[:m], truth[:, :, :m].clone(), blocking=r.random() < 0.5)
        except Exception as exc:  # reported below, with the others
            problems.append(("store", repr(exc)))

    def reader() -> None:
        try:
            while not done.is_set():
                for m in (n, CHUNK + 1, 5 * CHUNK):
                    looked = store.lookup(tokens[:m])
                    got, covered = store.retrieve(tokens[:m])
                    if covered % CHUNK and covered != m:
                        problems.append(("partial", m, covered))
                    if covered and not torch.equal(got, truth[:, :, :covered]):
                        problems.append(("wrong kv", m, covered))
                    if looked.tokens > m:
                        problems.append(("lookup past the prompt", m, looked.tokens))
        except Exception as exc:
            problems.append(("read", repr(exc)))

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    try:
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        for t in readers:
            t.join()
        store.store(tokens, truth)  # fills whatever no writer reached
        got, covered = store.retrieve(tokens)
        assert covered == n and torch.equal(got, truth)
    finally:
        done.set()
        backend.close()
    assert problems == []


# -- remote down -------------------------------------------------------------------------------


def test_retrieve_over_a_remote_that_is_down_is_a_miss(tmp_path, redis_server_private):
    tokens = list(range(3 * CHUNK))
    backend = open_backend(redis_server_private.url)
    try:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        assert store.store(tokens, kv_for(len(tokens))).stored == 3
        redis_server_private.kill()
        for _ in range(7):  # past the breaker's threshold: from then on it fails fast
            assert store.retrieve(tokens) == (None, 0)
    finally:
        backend.close()


def test_lookup_claims_nothing_of_a_remote_known_to_be_down(tmp_path, redis_server_private):
    """``lookup`` over a remote this process wrote said "48 of 48 tokens cached" after
    the server died, on every call, even once the circuit breaker had opened and every
    ``retrieve`` came back empty: an engine planned to load KV it could never get."""
    tokens = list(range(3 * CHUNK))
    backend = open_backend(redis_server_private.url)
    try:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        store.store(tokens, kv_for(len(tokens)))
        assert store.lookup(tokens).tokens == 3 * CHUNK
        redis_server_private.kill()
        for _ in range(7):
            assert store.retrieve(tokens) == (None, 0)
        assert backend.breaker.state == "open"  # the outage is known to this process
        assert store.lookup(tokens).tokens == 0
    finally:
        backend.close()
