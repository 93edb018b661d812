"""The backends the conformance suite runs over.

Each ``BackendCase`` knows how to open a fresh backend (and reopen the same
store, for persistent media). Local cases live here; remote and hybrid cases
come from ``cases_remote.py`` and ``cases_hybrid.py`` so each tier's owner edits
one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface


@dataclass
class CaseContext:
    """What a factory gets: a private temp dir and pytest's request (for server fixtures)."""

    tmp_path: Path
    request: pytest.FixtureRequest

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)


@dataclass(frozen=True)
class BackendCase:
    """How to open one kind of backend.

    ``make(ctx, budget_gb)`` opens the store (``budget_gb`` bounds local tiers);
    calling it again with the same ctx reopens the same store when ``persistent``.
    """

    name: str
    make: Callable[[CaseContext, float], LMCBackendInterface]
    evicts: bool = True  # has a local LRU budget
    persistent: bool = False  # a second make() sees the first one's chunks
    stores_bytes: bool = True  # keeps encoded chunks (False: tensors in memory only)


def _memory(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
    from lmcache_core.storage_backend.local_backend import LMCLocalBackend

    return LMCLocalBackend(LMCacheEngineConfig(max_local_cache_size=budget_gb), None, "cpu")


def _disk(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
    from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

    cfg = LMCacheEngineConfig(local_device=None, local_disk=str(ctx.tmp_path / "disk"), max_local_disk_size=budget_gb)
    return LMCLocalDiskBackend(cfg, None, "cpu")


LOCAL_CASES = [
    BackendCase("memory", _memory, stores_bytes=False),
    BackendCase("disk", _disk, persistent=True),
]


def all_cases() -> list[BackendCase]:
    from importlib.util import find_spec

    cases = list(LOCAL_CASES)
    if find_spec("tests.cases_remote"):
        from tests.cases_remote import REMOTE_CASES

        cases += REMOTE_CASES
    if find_spec("tests.cases_hybrid"):
        from tests.cases_hybrid import HYBRID_CASES

        cases += HYBRID_CASES
    return cases


def is_pipelined_twin(name: str) -> bool:
    """A pipelined variant whose plain twin runs too (single-key paths are shared)."""
    plain = {c.name for c in all_cases()}
    return name.endswith("-pipelined") and name.removesuffix("-pipelined") in plain


def case_selected(case: BackendCase, marker_kwargs: dict[str, bool]) -> bool:
    """Whether a test marked ``@pytest.mark.cases(...)`` runs over ``case``.

    ``plain_only``: not on pipelined twins (their single-key paths are the plain
    case's) nor on env-built twins of YAML-built hybrids; ``one_per_medium``: not on pipelined or cluster variants either;
    ``bytes_only``: only stores that keep encoded chunks. Cases left out are
    deselected at collection, so they never show as skipped.
    """
    # "env-" hybrid cases are their "yaml-" twins built from LMCACHE_* variables:
    # the conformance suite runs on both, the heavier sweeps on one.
    config_twin = case.name.startswith("env-")
    if marker_kwargs.get("plain_only") and (is_pipelined_twin(case.name) or config_twin):
        return False
    if marker_kwargs.get("one_per_medium") and (
        "pipelined" in case.name or "cluster" in case.name or config_twin
    ):
        return False
    return not (marker_kwargs.get("bytes_only") and not case.stores_bytes)
