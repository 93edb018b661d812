"""Crash consistency of the disk tier: SIGKILL writers at random moments, then audit.

The harness (``scripts/crash_harness.py``) does the work; this runs a small,
seeded count by default. Longer runs: ``LMCACHE_CRASH_ITERATIONS=2000`` or the
script itself (see docs/RELIABILITY.md for the figures of the long run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SCRIPTS = str(Path(__file__).resolve().parent.parent / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import crash_harness  # noqa: E402

ITERATIONS = int(os.environ.get("LMCACHE_CRASH_ITERATIONS", "5"))


def _check(summary: crash_harness.Summary) -> None:
    assert summary.failures == [], "\n".join(summary.failures)
    assert summary.kills >= summary.iterations
    assert summary.acked_ops > 0 and summary.chunk_files_verified > 0


@pytest.mark.timeout(600)
def test_sigkill_loses_no_acknowledged_chunk_and_leaves_no_torn_file(tmp_path):
    summary = crash_harness.run(
        str(tmp_path / "store"), iterations=ITERATIONS, procs=2, seed=11, cli_verify_every=ITERATIONS
    )
    _check(summary)
    assert summary.cli_verifies >= 1  # `lmcache verify --fix` on a just-killed store: clean
    assert summary.acked_puts_checked > 0 and summary.removes_checked >= 0


@pytest.mark.timeout(600)
def test_sigkill_with_fsync_and_eviction(tmp_path):
    summary = crash_harness.run(
        str(tmp_path / "store"), iterations=max(3, ITERATIONS // 2), procs=2, seed=12,
        fsync=True, budget_gb=4 * 1024**2 / 1024**3, evicts=True,
        max_delay=0.6,  # fsync'd writes are slow on a loaded machine: let some be acknowledged
    )
    _check(summary)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_long_crash_run(tmp_path):
    """``pytest -m slow``: 300 kills of 2 writers, `lmcache verify --fix` every 50."""
    summary = crash_harness.run(
        str(tmp_path / "store"), iterations=300, procs=2, seed=2026, cli_verify_every=50
    )
    _check(summary)
    assert summary.cli_verifies == 6
