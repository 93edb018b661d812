"""CacheEngineKey validation and the prefix-hash chain."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from lmcache_core import CacheEngineKey, chunk_hashes

H = "ab" * 32


def test_round_trip_lmcache_form():
    key = CacheEngineKey("vllm", "meta-llama/Llama-3.1-8B", 4, 3, H)
    text = key.to_string()
    assert text == f"vllm@meta-llama/Llama-3.1-8B@4@3@{H}"
    assert CacheEngineKey.from_string(text) == key
    assert hash(CacheEngineKey.from_string(text)) == hash(key)


def test_frozen():
    key = CacheEngineKey("vllm", "m", 1, 0, H)
    with pytest.raises(AttributeError):
        key.model_name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "args, field",
    [
        (("tf", "m", 1, 0, H), "fmt"),
        (("vllm", "", 1, 0, H), "model_name"),
        (("vllm", "a@b", 1, 0, H), "model_name"),
        (("vllm", "a\x00b", 1, 0, H), "model_name"),
        (("vllm", "x" * 600, 1, 0, H), "model_name"),
        (("vllm", "m", 0, 0, H), "world_size"),
        (("vllm", "m", 2, 2, H), "worker_id"),
        (("vllm", "m", 2, -1, H), "worker_id"),
        (("vllm", "m", 1, 0, "ABCD"), "chunk_hash"),
        (("vllm", "m", 1, 0, ""), "chunk_hash"),
        (("vllm", "m", 1, 0, "a" * 129), "chunk_hash"),
        (("vllm", "m", True, 0, H), "world_size"),
    ],
)
def test_invalid_keys_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        CacheEngineKey(*args)


@pytest.mark.parametrize(
    "text",
    ["vllm@m@1@0", "vllm@m@1@0@ab@cd", "vllm@m@01@0@ab", "vllm@m@ 1@0@ab", "vllm@m@1@+0@ab", "", "vllm@m@١@0@ab"],
)
def test_from_string_rejects_non_canonical(text):
    with pytest.raises(ValueError):
        CacheEngineKey.from_string(text)


def independent_chain(tokens: list[int], chunk_size: int) -> list[str]:
    out, prev = [], ""
    for i in range(0, len(tokens), chunk_size):
        part = b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens[i : i + chunk_size])
        prev = hashlib.sha256(prev.encode("ascii") + part).hexdigest()
        out.append(prev)
    return out


def test_chunk_hashes_matches_design_definition():
    tokens = list(range(1000))
    expected = independent_chain(tokens, 256)
    assert len(expected) == 4  # last chunk partial (232 tokens)
    assert chunk_hashes(tokens, 256) == expected


def test_chunk_hashes_same_for_list_numpy_torch():
    tokens = [5, 17, 2**40, 0, 31999] * 50
    a = chunk_hashes(tokens, 64)
    assert chunk_hashes(np.array(tokens, dtype=np.int64), 64) == a
    assert chunk_hashes(np.array(tokens, dtype=np.int64).astype(np.uint64), 64) == a
    assert chunk_hashes(torch.tensor(tokens), 64) == a


def test_equal_prefixes_share_hashes():
    a = chunk_hashes(list(range(600)), 256)
    b = chunk_hashes(list(range(512)) + [9] * 88, 256)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_chunk_hashes_bad_input():
    assert chunk_hashes([], 256) == []
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_hashes([1, 2], 0)
    with pytest.raises(ValueError, match="1-D"):
        chunk_hashes([[1, 2]], 2)
    with pytest.raises(ValueError, match="integers"):
        chunk_hashes([1.5, 2.0], 2)
