"""Regressions of the tools' store operations (``lmcache_core.store_ops``), fourth audit.

1. ``verify --fix`` on a remote store (Redis, fsspec) removed a bad chunk by key
   whatever the object held by then: a serving engine that missed on the bad chunk
   recomputed and put it again while verify was still reading, and the fix deleted
   that good copy. Now the object is checked again right before its removal and a
   good one is left alone.
2. ``lookup`` (``prefix_lookup``) on a remote or tiered store counted chunks by
   ``contains`` alone: a Redis object cut short (or a chunk of the wrong length) was
   "cached", and lookup said "40 of 40 tokens" where ``get --tokens`` returned 16.
   Now each chunk's header is read, per tier, as on a disk store.
3. ``evict`` removed a disk chunk that a serving process had read (used) after the
   plan was made: LRU and ``--older-than`` chose it by the atime they listed, the
   confirmation prompt waited, and the chunk just served was removed. Now a file
   whose atime moved since the plan is left alone, like one written again.

Real Redis, real files, real serving processes (subprocesses); no mocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from lmcache_core import layout
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import open_backend
from lmcache_core.store_ops import Store, plan_evict, prefix_lookup, read_prefix, run_evict, verify_store
from lmcache_core.tokens import ChunkedKVStore

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 16
TOKENS = list(range(1000, 1040))  # 40 tokens: chunks of 16, 16 and 8


def serving_process(code: str) -> None:
    """Run ``code`` in another Python process (a serving engine sharing the store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)


def chunk(seed: int, tokens: int = CHUNK) -> torch.Tensor:
    return torch.randn(2, 2, tokens, 4, 8, generator=torch.Generator().manual_seed(seed))


# -- 1. verify --fix on a remote store rechecks before it removes ----------------------------


def remote_url(kind: str, tmp_path: Path, redis_url: str) -> str:
    if kind == "redis":
        return f"{redis_url}?prefix=audit4-{uuid.uuid4().hex[:8]}:"
    remote = tmp_path / "remote"
    remote.mkdir()
    return f"fsspec+file://{remote}"


@pytest.mark.parametrize("kind", ["redis", "fsspec"])
def test_regression_verify_fix_deleted_a_remote_chunk_rewritten_after_its_check(
    kind: str, tmp_path: Path, redis_server: object
) -> None:
    url = remote_url(kind, tmp_path, redis_server.url)  # type: ignore[attr-defined]
    rewritten = CacheEngineKey("vllm", "m", 1, 0, "aa01")
    still_bad = CacheEngineKey("vllm", "m", 1, 0, "bb02")
    with open_backend(url, dst_device="cpu") as b:
        for i, k in enumerate((rewritten, still_bad)):
            b.put(k, chunk(i), blocking=True)
            raw = bytearray(b.fetch_bytes(k))  # type: ignore[attr-defined]
            raw[-1] ^= 0xFF  # a payload byte: the checksum fails
            b.connector.put(k, [bytes(raw)])  # type: ignore[attr-defined]
    rewrites: list[int] = []

    def engine_puts_a_good_copy(done: int, nbytes: int) -> None:
        # After the first check, before the fix: the engine missed on the bad chunk,
        # recomputed it and stored it again, from its own process.
        if not rewrites:
            rewrites.append(done)
            serving_process(
                "import torch\n"
                "from lmcache_core.storage_backend import open_backend\n"
                "from lmcache_core.key import CacheEngineKey\n"
                f"with open_backend({url!r}, dst_device='cpu') as b:\n"
                f"    t = torch.randn(2, 2, {CHUNK}, 4, 8, generator=torch.Generator().manual_seed(0))\n"
                f"    b.put(CacheEngineKey.from_string({rewritten.to_string()!r}), t, blocking=True)\n"
            )

    with Store(url) as store:
        report = verify_store(store, fix=True, jobs=1, progress=engine_puts_a_good_copy)
    assert rewrites, "the progress callback never ran"
    assert sorted(b.where for b in report.bad) == sorted([rewritten.to_string(), still_bad.to_string()])
    assert report.left_alone == [rewritten.to_string()]  # good by the time of the fix
    assert report.removed == [still_bad.to_string()]  # bad still: removed
    assert report.remaining_problems == 0
    with open_backend(url, dst_device="cpu") as b:
        got = b.get(rewritten)
        assert got is not None and torch.equal(got, chunk(0))  # the engine's good copy survived
        assert not b.contains(still_bad)
    with Store(url) as store:
        again = verify_store(store)
    assert (again.ok, again.bad, again.remaining_problems) == (1, [], 0)


# -- 2. lookup reads headers on remote and tiered stores ---------------------------------------


def store_prompt(url: str, model: str) -> list[CacheEngineKey]:
    kv = torch.randn(2, 2, len(TOKENS), 4, 8, generator=torch.Generator().manual_seed(7))
    with open_backend(url, dst_device="cpu") as b:
        kvs = ChunkedKVStore(b, model, chunk_size=CHUNK)
        assert kvs.store(TOKENS, kv).stored == 3
        return kvs.keys_for(TOKENS)


def cut(backend: object, key: CacheEngineKey) -> None:
    """Leave the remote's object of ``key`` cut short (a write that stopped midway)."""
    raw = bytes(backend.fetch_bytes(key))  # type: ignore[attr-defined]
    backend.connector.put(key, [raw[: len(raw) // 2]])  # type: ignore[attr-defined]


def test_regression_lookup_on_redis_counted_an_object_cut_short_as_cached(redis_server: object) -> None:
    url = f"{redis_server.url}?prefix=audit4-{uuid.uuid4().hex[:8]}:"  # type: ignore[attr-defined]
    keys = store_prompt(url, "m")
    with open_backend(url, dst_device="cpu") as b:
        cut(b, keys[1])
    with Store(url) as store:
        found = prefix_lookup(store, TOKENS, model="m", chunk_size=CHUNK)
        read = read_prefix(store, TOKENS, model="m", chunk_size=CHUNK)
    assert read.tokens == 16  # what get --tokens returns ...
    assert (found["tokens"], found["chunks"]) == (16, 1)  # ... is what lookup says is cached
    assert [t["tokens"] for t in found["per_tier"]] == [16]


def test_regression_lookup_on_redis_counted_a_chunk_of_the_wrong_length(redis_server: object) -> None:
    """A chunk under a prompt's key that covers other tokens (a hand-made put) ends the prefix."""
    url = f"{redis_server.url}?prefix=audit4-{uuid.uuid4().hex[:8]}:"  # type: ignore[attr-defined]
    keys = store_prompt(url, "m")
    with open_backend(url, dst_device="cpu") as b:
        b.put(keys[2], chunk(3, tokens=CHUNK), blocking=True)  # 16 tokens where 8 belong
    with Store(url) as store:
        found = prefix_lookup(store, TOKENS, model="m", chunk_size=CHUNK)
        read = read_prefix(store, TOKENS, model="m", chunk_size=CHUNK)
    assert read.tokens == found["tokens"] == 32
    assert found["chunks"] == 2


def test_lookup_on_a_tiered_store_reads_each_tiers_headers(tmp_path: Path) -> None:
    """A copy cut short in one tier ends that tier's prefix; the store's prefix goes
    on where another tier holds a sound copy, as ``get --tokens`` reads through."""
    from lmcache_core.config import LMCacheEngineConfig

    disk, remote = tmp_path / "disk", tmp_path / "remote"
    disk.mkdir()
    remote.mkdir()
    cfg = LMCacheEngineConfig(local_device=None, local_disk=str(disk), remote_url=f"fsspec+file://{remote}")
    with Store(config=cfg) as store:
        kvs = ChunkedKVStore(store.backend, "m", chunk_size=CHUNK)
        kvs.store(TOKENS, torch.randn(2, 2, len(TOKENS), 4, 8))
        keys = kvs.keys_for(TOKENS)
        tiers = dict(store.tiers() or [])
        cut(tiers["remote"], keys[1])
        found = prefix_lookup(store, TOKENS, model="m", chunk_size=CHUNK)
        assert {t["tier"]: t["tokens"] for t in found["per_tier"]} == {"disk": 40, "remote": 16}
        assert found["tokens"] == 40 == read_prefix(store, TOKENS, model="m", chunk_size=CHUNK).tokens
        disk_copy = Path(layout.disk_path(str(disk), keys[2]))
        disk_copy.write_bytes(disk_copy.read_bytes()[:100])  # the disk's last chunk cut too
        found = prefix_lookup(store, TOKENS, model="m", chunk_size=CHUNK)
        assert {t["tier"]: t["tokens"] for t in found["per_tier"]} == {"disk": 32, "remote": 16}
        assert found["tokens"] == 40 == read_prefix(store, TOKENS, model="m", chunk_size=CHUNK).tokens
        disk_copy.unlink()
        cut(tiers["remote"], keys[2])  # no sound copy of the last chunk anywhere
        found = prefix_lookup(store, TOKENS, model="m", chunk_size=CHUNK)
        assert found["tokens"] == 32 == read_prefix(store, TOKENS, model="m", chunk_size=CHUNK).tokens


# -- 3. evict leaves a chunk served since the plan --------------------------------------------


def test_regression_evict_removed_a_chunk_a_server_read_after_the_plan(tmp_path: Path) -> None:
    root = tmp_path / "store"
    keys = [CacheEngineKey("vllm", "m", 1, 0, f"{i:02x}{i:062x}") for i in range(3)]
    with open_backend(str(root), dst_device="cpu") as b:
        for i, k in enumerate(keys):
            b.put(k, chunk(i), blocking=True)
    old = time.time() - 10 * 86400
    for k in keys:
        os.utime(layout.disk_path(str(root), k), (old, old))

    with Store(str(root)) as store:
        plan = plan_evict(store.entries(), older_than=86400)
        assert {v.key for v in plan.victims} == set(keys)  # all unused for 10 days
        # While the prompt waits, a serving process serves the first chunk.
        serving_process(
            "from lmcache_core.storage_backend import open_backend\n"
            "from lmcache_core.key import CacheEngineKey\n"
            f"with open_backend({str(root)!r}, dst_device='cpu') as b:\n"
            f"    assert b.get(CacheEngineKey.from_string({keys[0].to_string()!r})) is not None\n"
        )
        result = run_evict(store, plan)
    assert result.left_alone == [keys[0].to_string()]
    assert result.removed == 2 and result.failures == []
    assert os.path.exists(layout.disk_path(str(root), keys[0]))  # the chunk just served stays
    assert not any(os.path.exists(layout.disk_path(str(root), k)) for k in keys[1:])


def test_evict_still_removes_chunks_nobody_used_since_the_plan(tmp_path: Path) -> None:
    """The atime the plan listed matches the file's own: an untouched chunk goes."""
    root = tmp_path / "store"
    keys = [CacheEngineKey("vllm", "m", 1, 0, f"{i:02x}{i:062x}") for i in range(4)]
    with open_backend(str(root), dst_device="cpu") as b:
        for i, k in enumerate(keys):
            b.put(k, chunk(i), blocking=True)
    with Store(str(root)) as store:
        listed = store.entries()
        size = listed[0].size or 0
        plan = plan_evict(listed, to_size=2 * size)
        assert len(plan.victims) == 2
        result = run_evict(store, plan)
        assert (result.removed, result.left_alone, result.freed) == (2, [], 2 * size)
        assert len(store.entries()) == 2
