"""Shared fixtures. Server fixtures (redis, S3) live in ``tests/servers.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
from tests.backend_cases import BackendCase, CaseContext, all_cases, case_selected
from tests.servers import *  # noqa: F401,F403  (redis, S3 fixtures)

CASES = all_cases()


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> BackendCase:
    return request.param  # type: ignore[no-any-return]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect backend cases a ``@pytest.mark.cases(...)`` test does not run over."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        marker = item.get_closest_marker("cases")
        case = callspec.params.get("case") if callspec is not None else None
        if marker is not None and isinstance(case, BackendCase) and not case_selected(case, marker.kwargs):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def open_store(
    case: BackendCase, tmp_path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LMCBackendInterface]]:
    """``open_store(budget_gb=1.0)`` opens (or reopens) the case's store; all closed at the end."""
    ctx = CaseContext(tmp_path, request)
    opened: list[LMCBackendInterface] = []

    def _open(budget_gb: float = 1.0) -> LMCBackendInterface:
        backend = case.make(ctx, budget_gb)
        opened.append(backend)
        return backend

    yield _open
    for b in opened:
        b.close()


def make_key(i: int | str = 0, model: str = "test/model", fmt: str = "vllm", ws: int = 1, wid: int = 0) -> CacheEngineKey:
    """A valid key whose hash is derived from ``i``."""
    import hashlib

    return CacheEngineKey(fmt, model, ws, wid, hashlib.sha256(str(i).encode()).hexdigest())


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``pred`` every 50 ms until it is true (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def ends_within(fn: Callable[[], Any], within: float) -> tuple[bool, Any]:
    """Run ``fn`` on a daemon thread: (whether it ended within ``within`` seconds, its
    result or the exception it raised). A call that hangs is left on its thread, so the
    test fails instead of hanging."""
    import threading

    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # returned, so the test asserts the type
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    return (not thread.is_alive(), out[0] if out else None)


@pytest.fixture
def private_cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LMCACHE_* variable of the caller leaks in; the default store is private (CLI tests)."""
    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
