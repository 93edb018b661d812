"""scripts/bench_lmcache.py without LMCache: our side and the raw medium on real
files and a real redis-server, the side-by-side table, and the refusal of an
interpreter that has no lmcache. LMCache's side needs its own virtual
environment (the script's docstring) and is not run here. No timings are asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_lmcache  # noqa: E402


@pytest.fixture(scope="module")
def chunks() -> list[Any]:
    return bench_lmcache.make_chunks(3, seed=5)  # two timed, one warm-up: 96 MiB


@pytest.mark.parametrize("tier", ["memory", "disk", "fs", "redis"])
def test_our_side_moves_every_chunk(tier: str, chunks: list[Any], tmp_path: Path, redis_server: Any) -> None:
    result = bench_lmcache._our_tier(tier, chunks, str(tmp_path / "store"), redis_server.url, repeat=0)
    assert "error" not in result, result["error"]
    ops = {"memory": {"put", "get", "get+copy"}}.get(tier, {"put_nonblocking", "get"})
    if tier in ("disk", "fs") and bench_lmcache.os.geteuid() == 0:
        ops |= {"get_cold"}
    assert set(result) == ops | {"close"}
    for op in ops:
        assert result[op]["n"] == 2 and len(result[op]["lat_ms"]) in (1, 2)
        assert bench_lmcache._gbps(result[op]) > 0
    assert "hung" not in result["close"] and result["close"]["s"] < 60


def test_raw_medium_rows(chunks: list[Any], tmp_path: Path, redis_server: Any) -> None:
    raw = bench_lmcache._raw(chunks[:2], str(tmp_path), redis_server.url)
    expected = {"copy_", "write", "readinto", "redis-py SET", "redis-py GET"}
    assert expected <= set(raw)
    assert all(bench_lmcache._gbps(raw[op]) > 0 for op in expected)


def test_table_ratios_and_hangs() -> None:
    def side(gbps: float, ops: tuple[str, ...]) -> dict[str, Any]:
        mib32 = bench_lmcache.chunk_bytes()
        return {op: {"s": 2 * mib32 / (gbps * 1e9), "n": 2, "lat_ms": [1.0, 2.0], "note": ""} for op in ops}

    ops = ("put_nonblocking", "get")
    hung = {"error": "close() hung (no return after 5 s)", "hung": True}
    closed = {"s": 0.01, "n": 0, "lat_ms": [], "note": ""}
    summary = {
        "tiers": ["redis"],
        "variants": {"redis": ["py"]},
        "raw": bench_lmcache._summarise([side(1.0, ("redis-py SET", "redis-py GET"))]),
        "ours": {"redis": bench_lmcache._summarise([{**side(0.9, ops), "close": closed}])},
        "lmcache": {"redis:py": bench_lmcache._summarise([{**side(0.3, ops), "close": hung}])},
    }
    rows = bench_lmcache._rows(summary)
    by_op = {r["op"]: r for r in rows}
    assert by_op["get"]["ratio"] == pytest.approx(3.0)
    assert by_op["get"]["raw"] == pytest.approx(1.0)
    assert by_op["get"]["paired_median"] == pytest.approx(3.0) and by_op["get"]["ahead"] == 1
    text = bench_lmcache._table(rows, markdown=True)
    close_line = next(line for line in text.splitlines() if "close()" in line)
    assert "hung" in close_line and "0.01 s" in close_line
    assert "| 3.00 | 3.00 (3.00-3.00) | 1 of 1 |" in text
    assert bench_lmcache._errors(rows) == ["redis:// (redis-py) close: close() hung (no return after 5 s)"]


def test_refuses_an_interpreter_without_lmcache(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_lmcache.py"), "--lmcache-python", sys.executable],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cannot import lmcache" in proc.stderr


def test_paired_ratios_are_taken_within_each_repeat() -> None:
    """Medians of each side mix the drift between repeats in; ratios within a repeat do not."""
    mib32 = bench_lmcache.chunk_bytes()

    def run(gbps: float) -> dict[str, Any]:
        return {"get": {"s": 2 * mib32 / (gbps * 1e9), "n": 2, "lat_ms": [1.0], "note": ""}}

    failed = {"get": {"error": "boom"}}
    ours = bench_lmcache._summarise([run(2.0), run(4.0), run(8.0), run(1.0)])
    theirs = bench_lmcache._summarise([run(1.0), run(5.0), failed, run(2.0)])
    summary = {"tiers": ["disk"], "variants": {"disk": ["-"]}, "raw": {},
               "ours": {"disk": ours}, "lmcache": {"disk:-": theirs}}  # fmt: skip
    (row,) = [r for r in bench_lmcache._rows(summary) if r["op"] == "get"]
    # Medians 3.0 and 2.0; within the repeats both sides ran: 2.0, 0.8, 0.5.
    assert row["ratio"] == pytest.approx(1.5)
    assert row["pairs"] == 3 and row["ahead"] == 1
    assert row["paired_median"] == pytest.approx(0.8)
    assert (row["paired_min"], row["paired_max"]) == (pytest.approx(0.5), pytest.approx(2.0))
