"""Hypothesis stateful test: memory and disk tiers against a model of an LRU cache.

Rules: put (three chunk sizes), get, contains, remove, reopen (a restart) and,
through a tight byte budget, eviction. The model is an exact LRU over the same
sizes the backends account (payload bytes in memory; file bytes on disk, with
the disk tier's pre-write estimate of payload + 512). After a disk restart the
LRU order comes from file times, which the model cannot know, so it then
tracks "maybe present" and checks the weaker promise: a hit is always the
latest version put, a removed key never comes back, the budget always holds.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import OrderedDict

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmcache_core import LMCacheEngineConfig, chunk_format
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.local_backend import LMCLocalBackend, LMCLocalDiskBackend

GB = 1024**3
SLOTS = 6
TOKENS = (1, 4, 16)  # 128 B, 512 B, 2 KiB of fp16


def key_for(slot: int) -> CacheEngineKey:
    return CacheEngineKey("vllm", "stateful/model", 1, 0, hashlib.sha256(bytes([slot])).hexdigest())


def value_for(slot: int, version: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(slot * 100_003 + version)
    return torch.randn((2, 2, tokens, 2, 8), generator=g).half()


class LRUCacheMachine(RuleBasedStateMachine):
    """Subclasses set ``kind`` (``memory``/``disk``) and ``budget`` (bytes; 0: roomy)."""

    kind = "memory"
    budget = 0

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="lmcache-stateful-")
        self.version = 0
        # slot -> (version, tokens, accounted size), least recently used first
        self.lru: OrderedDict[int, tuple[int, int, int]] = OrderedDict()
        self.maybe: dict[int, tuple[int, int]] = {}  # after a restart: slot -> (version, tokens)
        self.order_known = True
        self.store = self._open()

    # -- the system under test --------------------------------------------------------------

    def _open(self) -> LMCLocalBackend | LMCLocalDiskBackend:
        gb = (self.budget or GB) / GB
        if self.kind == "memory":
            return LMCLocalBackend(LMCacheEngineConfig.from_defaults(max_local_cache_size=gb), None, "cpu")
        cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=self.tmp, max_local_disk_size=gb)
        return LMCLocalDiskBackend(cfg, None, "cpu")

    def _sizes(self, slot: int, value: torch.Tensor) -> tuple[int, int]:
        """(bytes reserved before the write, bytes accounted after it), as the backend does."""
        nbytes = value.numel() * value.element_size()
        if self.kind == "memory":
            return nbytes, nbytes
        size = len(chunk_format.encode_header(value, key_for(slot).to_string())) + nbytes
        return size, size  # the file's exact size, made room for before the write

    def _evict_for(self, need_bytes: int, exclude: int) -> None:
        budget = self.store._index.budget
        used = sum(s for _, _, s in self.lru.values())
        need = used + need_bytes - budget
        if exclude in self.lru:
            need -= self.lru[exclude][2]
        for slot in list(self.lru):
            if need <= 0:
                break
            if slot != exclude:
                need -= self.lru.pop(slot)[2]

    # -- rules ------------------------------------------------------------------------------------

    @rule(slot=st.integers(0, SLOTS - 1), tokens=st.sampled_from(TOKENS))
    def put(self, slot: int, tokens: int) -> None:
        self.version += 1
        value = value_for(slot, self.version, tokens)
        self.store.put(key_for(slot), value)
        reserve, size = self._sizes(slot, value)
        if self.order_known:
            self._evict_for(reserve, exclude=slot)
            self.lru.pop(slot, None)
            self.lru[slot] = (self.version, tokens, size)
            self._evict_for(0, exclude=slot)
        else:  # eviction order unknown: every other key may have gone
            for other in list(self.lru):
                v, t, _ = self.lru.pop(other)
                self.maybe[other] = (v, t)
            self.maybe.pop(slot, None)
            self.lru[slot] = (self.version, tokens, size)

    @rule(slot=st.integers(0, SLOTS - 1))
    def get(self, slot: int) -> None:
        got = self.store.get(key_for(slot))
        if slot in self.lru:
            version, tokens, _ = self.lru[slot]
            assert got is not None, f"slot {slot} should be present"
            assert torch.equal(got, value_for(slot, version, tokens))
            self.lru.move_to_end(slot)
        elif slot in self.maybe:
            version, tokens = self.maybe.pop(slot)
            if got is not None:
                assert torch.equal(got, value_for(slot, version, tokens)), "stale or wrong version"
                self.lru[slot] = (version, tokens, 0)  # present after all; its size is unknown
        else:
            assert got is None, f"slot {slot} was removed or never put, yet came back"

    @rule(slot=st.integers(0, SLOTS - 1))
    def contains(self, slot: int) -> None:
        found = self.store.contains(key_for(slot))
        if slot in self.lru:
            assert found
        elif slot not in self.maybe:
            assert not found

    @rule(slot=st.integers(0, SLOTS - 1))
    def remove(self, slot: int) -> None:
        was = self.store.remove(key_for(slot))
        if slot in self.lru:
            assert was
        elif slot not in self.maybe:
            assert not was
        self.lru.pop(slot, None)
        self.maybe.pop(slot, None)

    @precondition(lambda self: self.kind == "disk")
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()
        # Everything survives a restart (the budget is unchanged, so nothing is evicted),
        # but the LRU order is rebuilt from file times the model does not know.
        if self.lru and self.budget:
            self.order_known = False

    @precondition(lambda self: self.kind == "memory")
    @rule()
    def restart_memory(self) -> None:
        self.store.close()
        self.store = self._open()
        self.lru.clear()
        self.maybe.clear()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def budget_holds(self) -> None:
        assert self.store.used_bytes <= self.store._index.budget

    @invariant()
    def listing_matches(self) -> None:
        listed = {k.chunk_hash for k in self.store.list()}
        expected = {key_for(s).chunk_hash for s in self.lru}
        possible = expected | {key_for(s).chunk_hash for s in self.maybe}
        assert expected <= listed <= possible

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


STEPS = settings(max_examples=15, stateful_step_count=30, deadline=None, database=None)


class MemoryRoomy(LRUCacheMachine):
    kind, budget = "memory", 0


class MemoryTight(LRUCacheMachine):
    kind, budget = "memory", 4096


class DiskRoomy(LRUCacheMachine):
    kind, budget = "disk", 0


class DiskTight(LRUCacheMachine):
    kind, budget = "disk", 6144


TestMemoryRoomy = MemoryRoomy.TestCase
TestMemoryTight = MemoryTight.TestCase
TestDiskRoomy = DiskRoomy.TestCase
TestDiskTight = DiskTight.TestCase
for _case in (TestMemoryRoomy, TestMemoryTight, TestDiskRoomy, TestDiskTight):
    _case.settings = STEPS
del _case
