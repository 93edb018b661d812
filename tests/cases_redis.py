"""Redis cases for the conformance suite: a server and a 3-node cluster, plain and pipelined.

All cases share the session's servers; each test gets its own key prefix, derived
from its temp dir, so tests never see each other's chunks and a second ``make()``
in the same test reopens the same chunks.
"""

from __future__ import annotations

import hashlib
from typing import Callable
from urllib.parse import quote

from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from tests.backend_cases import BackendCase, CaseContext


def case_prefix(ctx: CaseContext) -> str:
    """A prefix unique to the test (and stable within it), with a glob character to escape."""
    digest = hashlib.sha256(str(ctx.tmp_path).encode()).hexdigest()[:16]
    return f"lmct[{digest}]:"


def _opener(fixture: str, pipelined: bool) -> Callable[[CaseContext, float], LMCBackendInterface]:
    def make(ctx: CaseContext, budget_gb: float) -> LMCBackendInterface:
        from lmcache_core.storage_backend import open_backend

        url = ctx.fixture(fixture).url
        return open_backend(f"{url}?prefix={quote(case_prefix(ctx))}", pipelined=pipelined, dst_device="cpu")

    return make


REDIS_CASES: list[BackendCase] = [
    BackendCase("redis", _opener("redis_server", False), evicts=False, persistent=True),
    BackendCase("redis-pipelined", _opener("redis_server", True), evicts=False, persistent=True),
    BackendCase("redis-cluster", _opener("redis_cluster", False), evicts=False, persistent=True),
    BackendCase("redis-cluster-pipelined", _opener("redis_cluster", True), evicts=False, persistent=True),
]
