"""The benchmark scripts end to end on tiny chunks: they start their own redis-server and
moto S3 server (scripts/bench_servers.py) and report every store.
No timings are asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_bench_remote_script_on_its_own_servers(tmp_path: Path) -> None:
    out = tmp_path / "remote.json"
    proc = _run("bench_remote.py", "--count", "2", "--batch", "4", "--rounds", "1",
                "--shape", "2,2,4,2,8", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == []
    stores = {row["store"] for row in report["rows"]}
    assert stores == {
        "s3 (moto, loopback)", "s3 (moto, loopback) pipelined", "redis (loopback)", "redis (loopback) pipelined"
    }  # fmt: skip
    assert {b["store"] for b in report["batch_vs_sequential"]} == {"s3 (moto, loopback)", "redis (loopback)"}
    assert all(b["misses"] == 0 for b in report["batch_vs_sequential"])
    assert "redis-py GET" in proc.stdout and "s3 cat_file" in proc.stdout


def test_bench_script_matrix_without_docs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    docs = ROOT / "docs" / "BENCHMARKS.md"
    before = docs.read_bytes() if docs.exists() else None
    proc = _run("bench.py", "--only", "memory,disk,redis,s3", "--sizes", "0.015625", "--count", "2",
                "--batch", "2", "--dir", str(tmp_path), "--no-docs", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (size,) = report["sizes"].values()
    assert size["errors"] == []
    assert {row["store"].split(" ")[0] for row in size["rows"]} == {"memory", "disk", "redis", "s3"}
    assert (docs.read_bytes() if docs.exists() else None) == before  # --no-docs wrote nothing
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # the disk stores were removed
    # The servers it started are on this machine: their batched_get rows carry the CPU both sides spent.
    for store in ("redis", "s3"):
        (row,) = [r for r in size["rows"] if r["store"].startswith(store) and r["op"] == "batched_get[2]"]
        cpu = row["cpu"]
        assert cpu["cores"] == len(os.sched_getaffinity(0))
        assert cpu["wall_s"] > 0 and cpu["raw_wall_s"] > 0
        # The client's own CPU is read with nanosecond resolution: real reads spend some.
        assert cpu["client_cpu_s"] > 0 and cpu["raw_client_cpu_s"] > 0
        # The server's comes from /proc in 10 ms ticks: tiny reads may spend none of them.
        assert cpu["server_cpu_s"] >= 0 and cpu["raw_server_cpu_s"] >= 0
        assert cpu["summary"] in row["note"]
        if cpu["best_ratio"] is None:  # tiny chunks: a few clock ticks, so no bound is claimed
            assert "too little CPU time" in row["note"]
        else:  # the bound is the sequential wall time over the batch's CPU spread over every core
            floor = (cpu["client_cpu_s"] + cpu["server_cpu_s"]) / cpu["cores"]
            assert cpu["best_ratio"] == pytest.approx(cpu["raw_wall_s"] / floor, rel=0.03)
    local = [r for r in size["rows"] if r["store"].split(" ")[0] in ("memory", "disk")]
    assert local and not any("cpu" in r for r in local)  # no server to account for


def test_gpu_check_runs_its_checks_on_cpu(tmp_path: Path) -> None:
    """``--device cpu``: every check of scripts/gpu_check.py runs without a GPU, so the
    script that is run once on a GPU machine is not run for the first time there."""
    out = tmp_path / "gpu.json"
    proc = _run("gpu_check.py", "--device", "cpu", "--count", "3", "--reps", "1",
                "--shape", "2,2,16,2,8", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert set(report["tiers"]) == {
        "memory cpu -> cuda (pinned pool)", "memory on cuda (get: zero-copy)",
        "disk -> cuda (pinned read buffers)", "hybrid memory+disk -> cuda",
        "hybrid memory on cuda+disk",
    }  # fmt: skip
    for ops in report["tiers"].values():
        assert all(r["samples"] == 3 and r["gbps"] > 0 for r in ops.values())
    assert "correctness: ok" in proc.stdout


def test_gpu_check_finds_a_wrong_tensor(tmp_path: Path) -> None:
    """The correctness check can fail: a store that hands back altered bytes is reported."""
    code = (
        "import sys, torch\n"
        "sys.argv = ['gpu_check.py', '--device', 'cpu', '--count', '2', '--reps', '1',"
        f" '--shape', '2,2,16,2,8', '--json', {str(tmp_path / 'g.json')!r}]\n"
        "sys.path.insert(0, 'scripts')\n"
        "import gpu_check\n"
        "from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend\n"
        "real = LMCLocalDiskBackend.get\n"
        "def bad(self, key):\n"
        "    t = real(self, key)\n"
        "    return None if t is None else t.clone().add_(1)\n"
        "LMCLocalDiskBackend.get = bad\n"
        "sys.exit(gpu_check.main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAIL disk -> cuda (pinned read buffers) get 0: bytes differ" in proc.stderr
    assert "correctness: FAILED" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_2(tmp_path: Path) -> None:
    proc = _run("gpu_check.py", "--json", str(tmp_path / "g.json"))
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
