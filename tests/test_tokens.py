"""Token-level store / lookup / retrieve, checked against an independent computation."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lmcache_core import CacheEngineKey, LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend import CreateStorageBackend, open_backend
from lmcache_core.tokens import ChunkedKVStore

CHUNK = 16


def kv_for(n_tokens: int, fmt: str = "vllm", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 2, n_tokens, 3, 4) if fmt == "vllm" else (2, 2, 3, n_tokens, 4)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def expected_keys(tokens: list[int], model: str, fmt: str = "vllm") -> list[CacheEngineKey]:
    keys, prev = [], ""
    for i in range(0, len(tokens), CHUNK):
        raw = b"".join(t.to_bytes(8, "little", signed=True) for t in tokens[i : i + CHUNK])
        prev = hashlib.sha256(prev.encode() + raw).hexdigest()
        keys.append(CacheEngineKey(fmt, model, 1, 0, prev))
    return keys


@pytest.mark.parametrize("fmt", ["vllm", "huggingface"])
def test_store_splits_by_chunk_and_keys_by_prefix_hash(tmp_path, fmt):
    tokens = list(range(100, 150))  # 3 full chunks + 2 tokens
    kv = kv_for(len(tokens), fmt)
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "org/m", fmt=fmt, chunk_size=CHUNK)
        result = store.store(tokens, kv)
        assert (result.chunks, result.stored, result.skipped) == (4, 4, 0)
        axis = 2 if fmt == "vllm" else 3
        for i, key in enumerate(expected_keys(tokens, "org/m", fmt)):
            piece = kv.narrow(axis, i * CHUNK, min(CHUNK, len(tokens) - i * CHUNK))
            assert torch.equal(backend.get(key), piece)
        again = store.store(tokens, kv)
        assert (again.stored, again.skipped) == (0, 4)


def test_lookup_and_retrieve_longest_prefix(tmp_path):
    tokens = list(range(64))
    kv = kv_for(64)
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        store.store(tokens, kv)
        # A longer prompt sharing the first 40 tokens: 2 full chunks are cached.
        query = tokens[:40] + [999] * 30
        look = store.lookup(query)
        assert (look.tokens, look.chunks, look.total_chunks) == (32, 2, 5)
        got, n = store.retrieve(query)
        assert n == 32 and torch.equal(got, kv[:, :, :32])
        # Remove the middle chunk: the prefix stops before it.
        backend.remove(expected_keys(tokens, "m")[1])
        got, n = store.retrieve(tokens)
        assert n == 16 and torch.equal(got, kv[:, :, :16])
        assert store.retrieve([5, 6, 7]) == (None, 0)


def test_partial_last_chunk_counts_its_tokens(tmp_path):
    tokens = list(range(20))
    kv = kv_for(20)
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        store.store(tokens, kv)
        got, n = store.retrieve(tokens)
        assert n == 20 and torch.equal(got, kv)
        assert store.lookup(tokens).tokens == 20


def test_lookup_per_tier(tmp_path):
    cfg = LMCacheEngineConfig.from_defaults(local_device="cpu", local_disk=str(tmp_path), max_local_cache_size=0.01)
    backend = CreateStorageBackend(cfg, LMCacheEngineMetadata("m"), "cpu")
    tokens = list(range(48))
    store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
    store.store(tokens, kv_for(48))
    memory = dict(backend.tiers())["memory"]
    memory.remove(expected_keys(tokens, "m")[2])
    look = store.lookup(tokens)
    assert look.tokens == 48
    assert look.per_tier == {"memory": 32, "disk": 48}
    backend.close()


def test_bad_kv_shapes(tmp_path):
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        with pytest.raises(ValueError, match="tokens"):
            store.store(list(range(10)), kv_for(12))
        with pytest.raises(ValueError, match="5 dimensions"):
            store.store(list(range(10)), torch.zeros(10, 4))
        with pytest.raises(TypeError):
            store.store([1], [[1.0]])
    with pytest.raises(ValueError, match="model_name"):
        ChunkedKVStore(backend, "a@b")


def test_retrieve_never_joins_chunks_of_different_dtypes_or_shapes(tmp_path):
    """Found by review: chunks of one prefix put by different puts (another dtype, another
    head count) were joined by torch.cat, silently upcast (fp16 + fp32 -> fp32) or failing
    with a raw RuntimeError. The prefix now ends at the first chunk that does not match."""
    tokens = list(range(3 * CHUNK))
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        first = kv_for(CHUNK).half()
        store.store(tokens[:CHUNK], first)
        store.store(tokens, kv_for(3 * CHUNK).float())  # chunk 0 is kept: "already cached"
        got, n = store.retrieve(tokens)
        assert n == CHUNK and got.dtype == torch.float16 and torch.equal(got, first)
        other = ChunkedKVStore(backend, "h", chunk_size=CHUNK)
        other.store(tokens[:CHUNK], kv_for(CHUNK))  # 3 heads
        wider = torch.randn(2, 2, 3 * CHUNK, 5, 4).to(torch.bfloat16)  # 5 heads
        other.store(tokens, wider)
        got, n = other.retrieve(tokens)
        assert n == CHUNK and got.shape == (2, 2, CHUNK, 3, 4)


def test_an_empty_prompt_stores_nothing(tmp_path):
    """Found by review: an empty token list failed inside zip() (torch.split of an empty
    axis gives one empty piece for no key)."""
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        result = store.store([], kv_for(0))
        assert (result.chunks, result.stored, result.skipped) == (0, 0, 0)
        assert backend.list() == [] and store.retrieve([]) == (None, 0)


def test_a_chunk_the_remote_tier_did_not_take_is_failed_and_put_again_next_time(tmp_path, redis_server_private):
    """Found by review: with a hybrid's remote down, put --tokens (and warm) reported every
    chunk stored, and a rerun skipped them all (contains() answers from the disk tier), so
    the remote was never filled. Now such chunks are failed, and a rerun writes them."""
    from lmcache_core.store_ops import Store, copy_chunk

    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=str(tmp_path / "disk"),
        remote_url=f"{redis_server_private.url}?prefix=tok-{tmp_path.name}:", remote_timeout=0.5,
    )  # fmt: skip
    tokens = list(range(2 * CHUNK))
    redis_server_private.kill()
    backend = CreateStorageBackend(cfg, LMCacheEngineMetadata("m"), "cpu")
    try:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        first = store.store(tokens, kv_for(2 * CHUNK))
        assert (first.stored, first.failed, first.skipped) == (0, 2, 0)
    finally:
        backend.close()
    redis_server_private.restart()
    backend = CreateStorageBackend(cfg, LMCacheEngineMetadata("m"), "cpu")
    try:
        again = ChunkedKVStore(backend, "m", chunk_size=CHUNK).store(tokens, kv_for(2 * CHUNK))
        assert (again.stored, again.failed, again.skipped) == (2, 0, 0)  # not skipped: the remote lacked them
        assert all(backend.remote.contains(k) for k in expected_keys(tokens, "m"))
        assert ChunkedKVStore(backend, "m", chunk_size=CHUNK).store(tokens, kv_for(2 * CHUNK)).skipped == 2
    finally:
        backend.close()
    # warm into the same tiered store: skipped only where every tier has the chunk
    source = open_backend(str(tmp_path / "src"))
    key = CacheEngineKey("vllm", "w", 1, 0, "ab" * 32)
    source.put(key, kv_for(CHUNK))
    source.close()
    with Store(str(tmp_path / "src")) as src, Store(None, cfg) as dst:
        redis_server_private.kill()
        outcome, _, reason = copy_chunk(src, dst, key)
        assert outcome == "failed" and "remote" in reason
    redis_server_private.restart()
    with Store(str(tmp_path / "src")) as src, Store(None, cfg) as dst:
        assert copy_chunk(src, dst, key)[0] == "copied"
        assert copy_chunk(src, dst, key)[0] == "skipped"


@pytest.mark.parametrize("last_tokens", [7, 1], ids=["longer", "shorter"])
def test_a_last_chunk_of_another_length_ends_the_prefix(tmp_path, last_tokens):
    """The prompt's last chunk was taken at any length: a 7-token chunk under a 2-token
    tail's key gave KV 5 tokens longer than the tokens it was said to cover, and a
    1-token one silently covered one token less."""
    from lmcache_core.store_ops import Store, read_prefix

    tokens = list(range(2 * CHUNK + 2))  # 2 full chunks + a 2-token tail
    kv = kv_for(len(tokens))
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "m", chunk_size=CHUNK)
        store.store(tokens, kv)
        backend.put(expected_keys(tokens, "m")[-1], kv_for(last_tokens, seed=9))  # a hand-made put
        got, n = store.retrieve(tokens)
        assert n == 2 * CHUNK and got is not None and got.shape[2] == n
    with Store(str(tmp_path)) as tool:
        read = read_prefix(tool, torch.tensor(tokens), model="m", chunk_size=CHUNK)
        assert read.tokens == 2 * CHUNK and sum(c.shape[2] for c in read.chunks) == read.tokens
        assert read.stopped is not None and "does not continue the prefix" in read.stopped.reason


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(torch.zeros(2, 3, 40, 3, 4, dtype=torch.float16), id="three-on-the-kv-axis"),
        pytest.param(torch.zeros(2, 2, 40, 3, 4, dtype=torch.int64), id="int64"),
        pytest.param(torch.zeros(2, 2, 40, 3, 4, dtype=torch.bool), id="bool"),
    ],
)
def test_store_refuses_a_tensor_that_is_no_kv_cache_and_stores_nothing(tmp_path, bad):
    """Only the rank and the token count were checked: an int or [L, 3, T, H, D] tensor
    was stored as KV chunks, to be served to an engine as if it were KV."""
    with open_backend(str(tmp_path)) as backend:
        store = ChunkedKVStore(backend, "org/m", chunk_size=CHUNK)
        with pytest.raises(ValueError, match="axis 1|floating-point"):
            store.store(list(range(40)), bad)
        assert backend.list() == []
