"""Listing one model's and rank's chunks (what a hybrid's prefetch needs) without
scanning the rest of the store (DESIGN §4: "S3 listing a prefix must not scan other
models"). Real moto S3, a real redis-server and a real directory; found by review:
prefetch of a model with 3 chunks listed all 203 objects of a shared bucket."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest
import torch

from lmcache_core import chunk_format
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.connector.base import RemoteConnector

MINE = ("vllm", "org/llama", 2, 1)
OTHERS = [
    ("vllm", "org/llama", 2, 0),  # another rank
    ("vllm", "org/llama-2", 2, 1),  # a model whose name starts with this one's
    ("huggingface", "org/llama", 2, 1),  # another fmt
    ("vllm", "org", 2, 1),  # a model whose directory holds this one's
]


def _key(scope: tuple[str, str, int, int], i: int) -> CacheEngineKey:
    return CacheEngineKey(*scope, hashlib.sha256(f"{scope}{i}".encode()).hexdigest())


def _fill(conn: RemoteConnector) -> set[CacheEngineKey]:
    mine = {_key(MINE, i) for i in range(3)}
    for key in itertools.chain(mine, (_key(s, i) for s in OTHERS for i in range(4))):
        header, payload = chunk_format.encode(torch.ones(4), key.to_string())
        conn.put(key, [header, payload])
    return mine


def _connector(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> RemoteConnector:
    tag = "lr-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]
    if kind == "file":
        from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector

        return FsspecConnector(f"file://{tmp_path}/{tag}", timeout=5.0)
    if kind == "s3":
        from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector

        server = request.getfixturevalue("s3_server")
        return FsspecConnector(server.url(tag), timeout=5.0, **server.options)
    from lmcache_core.storage_backend.connector.redis_connector import RedisConnector

    server = request.getfixturevalue("redis_server")
    return RedisConnector(server.url, timeout=5.0, prefix=f"{tag}:")


@pytest.mark.parametrize("kind", ["file", "s3", "redis"])
def test_list_rank_returns_exactly_one_ranks_chunks_and_lists_only_their_names(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = _connector(kind, request, tmp_path)
    try:
        mine = _fill(conn)
        assert len(list(conn.list())) == len(mine) + 4 * len(OTHERS)
        listed: list[str] = []  # what the store was asked to enumerate
        if kind == "redis":
            scan = conn._scan  # type: ignore[attr-defined]
            monkeypatch.setattr(conn, "_scan", lambda node, pattern: (listed.append(pattern), scan(node, pattern))[1])
        else:
            find = conn.fs.find  # type: ignore[attr-defined]
            monkeypatch.setattr(conn.fs, "find", lambda path, **kw: (listed.append(path), find(path, **kw))[1])
        got = {o.key for o in conn.list_rank(*MINE)}
        assert got == mine
        assert listed and all("org%2Fllama" in p or "org/llama@2@1@" in p for p in listed), listed
        assert all("llama-2" not in p for p in listed)
        assert not list(conn.list_rank("vllm", "org/nobody", 1, 0))  # an empty rank: nothing, no error
    finally:
        conn.close()
