"""The benchmark engine on tiny chunks: report structure and cleanup (no timings asserted)."""

from __future__ import annotations

import json
import os
import time

import pytest

from lmcache_core.bench import (
    ROW_KEYS,
    BenchTarget,
    _cpu_bound,
    _CpuTally,
    _Series,
    chunk_shape_for,
    format_table,
    process_cpu_s,
    run_bench,
)


def test_memory_and_disk_report_structure_and_cleanup(tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "keep.txt").write_text("not ours")  # the bench must leave other files alone
    messages: list[str] = []
    report = run_bench(
        ["cpu://", str(store_dir)], kv_shape=(2, 2, 4, 2, 8), count=3, batch=4, progress=messages.append
    )
    assert report.errors == []
    assert messages
    ops = {(r["store"], r["op"]) for r in report.rows}
    for store in ("cpu://", str(store_dir)):
        for op in ("put", "put_nonblocking", "get", "batched_get[4]"):
            assert (store, op) in ops
    assert (str(store_dir), "get_cold") in ops
    # Even as root, only the run's own files leave the page cache unless drop_caches=True
    # (a whole-machine drop would throw out a co-located engine's hot chunks too).
    (cold,) = [r for r in report.rows if r["op"] == "get_cold"]
    assert "posix_fadvise" in cold["note"] and "drop_caches" not in cold["note"]
    # The disk get carries its measured ceiling: readinto + the checksum, against readinto.
    (dget,) = [r for r in report.rows if r["store"] == str(store_dir) and r["op"] == "get"]
    assert dget["checksum_ceiling_op"] == "readinto + xxh3_128" and dget["checksum_ceiling"] > 0
    assert all("checksum_ceiling" not in r for r in report.rows if r is not dget)
    for row in report.rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["gbps"] and row["gbps"] > 0 and row["raw_gbps"] and row["raw_gbps"] > 0
        assert row["ratio"] == pytest.approx(row["gbps"] / row["raw_gbps"], rel=0.01)
        assert 0 <= row["p50_ms"] <= row["p99_ms"]
        assert row["raw_op"]
    doc = report.to_dict()
    json.dumps(doc)  # JSON-ready
    assert doc["params"]["chunk_bytes"] == 2 * 2 * 4 * 2 * 8 * 2
    assert doc["machine"]["cores"] >= 1
    # Cleaned up: only the file that was there before.
    left = sorted(
        os.path.relpath(os.path.join(d, f), store_dir) for d, _, fs in os.walk(store_dir) for f in fs
    )
    assert left == ["keep.txt"]
    assert sorted(os.listdir(store_dir)) == ["keep.txt"]
    table = format_table(report.rows)
    assert "put_nonblocking" in table and "ratio" in table
    assert format_table(report.rows, markdown=True).startswith("| store |")
    # Local tiers time the non-blocking put in rounds, each one's ratio in the note;
    # the row's samples are every round's puts (the store holds max(count, batch) = 4).
    for store in ("cpu://", str(store_dir)):
        (nb,) = [r for r in report.rows if r["store"] == store and r["op"] == "put_nonblocking"]
        rounds = nb["note"].split("ratio per round ")[1].split(";")[0].split(", ")
        assert len(rounds) == 3 and all(float(x) > 0 for x in rounds)
        assert nb["samples"] == 3 * 4


def test_a_broken_store_is_reported_not_raised(tmp_path):
    def broken(meta, capacity):
        raise ConnectionError("nobody home")

    target = BenchTarget(name="broken", open=broken, kind="disk", raw_url=str(tmp_path))
    report = run_bench([target], kv_shape=(4, 8), count=2, batch=2)
    assert report.rows == []
    assert report.errors and "nobody home" in report.errors[0]["error"]
    assert os.listdir(tmp_path) == []


def test_chunk_shape_choice():
    import torch

    assert chunk_shape_for(None, None, torch.bfloat16) == (32, 2, 256, 8, 128)
    assert chunk_shape_for(2 << 20, None, torch.bfloat16) == (32, 2, 16, 8, 128)
    assert chunk_shape_for(1000, None, torch.float16) == (500,)
    assert chunk_shape_for(None, (3, 4), torch.float16) == (3, 4)
    with pytest.raises(ValueError):
        chunk_shape_for(3, None, torch.float16)
    with pytest.raises(ValueError):
        run_bench(["cpu://"], count=1)


@pytest.mark.parametrize(
    "name", ["redis://user:hunter2@127.0.0.1:1/0?prefix=x", "redis://127.0.0.1:1/0?prefix=x&password=hunter2"]
)
def test_a_broken_store_with_a_secret_in_its_url_is_reported_masked(name):
    def broken(meta, capacity):
        raise ConnectionError("nobody home")

    target = BenchTarget(name=name, open=broken, kind="redis", raw_url=name)
    report = run_bench([target], kv_shape=(4, 8), count=2, batch=2)  # nothing listens on port 1
    assert report.errors and report.errors[0]["store"].startswith("redis://")
    assert "hunter2" not in json.dumps(report.to_dict())


def test_cpu_tally_reads_a_live_process_and_bounds_the_ratio():
    assert process_cpu_s(os.getpid()) is not None
    assert process_cpu_s(2**22 + 12345) is None  # above Linux's pid_max: no such process
    tally = _CpuTally(os.getpid())  # this process stands in for the server
    with tally:
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
    assert tally.client_s >= 0.05
    assert tally.server_s is not None and tally.server_s > 0  # /proc counts 10 ms ticks
    gone = _CpuTally(2**22 + 12345)
    with gone:
        pass
    assert gone.server_s is None  # unknown, never a made-up zero

    seq, batched = _Series(), _Series()
    seq.times, batched.times = [2_000_000_000], [1_500_000_000]  # 2 s sequential, 1.5 s batched
    seq_cpu, batched_cpu = _CpuTally(1), _CpuTally(1)
    seq_cpu.client_s, seq_cpu.server_s = 1.0, 1.0
    batched_cpu.client_s, batched_cpu.server_s = 2.0, 1.0
    out = _cpu_bound(seq, seq_cpu, batched, batched_cpu)
    cores = len(os.sched_getaffinity(0))
    assert out["cores"] == cores
    assert out["best_ratio"] == pytest.approx(2.0 / (3.0 / cores), rel=0.01)
    assert out["best_ratio_at_sequential_cpu"] == pytest.approx(2.0 / (2.0 / cores), rel=0.01)
    # A few 10 ms ticks bound nothing: no ratio is made up from them.
    seq_cpu.client_s, seq_cpu.server_s = 0.03, 0.02
    batched_cpu.client_s, batched_cpu.server_s = 0.02, 0.01
    tiny = _cpu_bound(seq, seq_cpu, batched, batched_cpu)
    assert tiny["best_ratio"] is None and tiny["best_ratio_at_sequential_cpu"] is None
    assert "too little CPU time" in tiny["summary"]


def test_the_raw_disk_files_are_laid_out_as_the_stores_chunk_files(tmp_path, monkeypatch):
    """The raw baseline writes and reads the same bytes in the same places as the store:
    a file of the payload alone (no header) was a different write on ext4 (a 2 MiB one at
    offset 0 of a new file took 8x longer), which inflated the disk put ratios."""
    import lmcache_core.bench as bench

    sizes: dict[str, list[int]] = {"raw": [], "ours": []}
    real_cleanup = bench._cleanup

    def measure_then_clean(store, open_store, written, raw, *rest):
        sizes["raw"] = sorted(os.path.getsize(p) for p in raw.paths(range(4)) if os.path.exists(p))
        ours = [os.path.join(d, f) for d, _, fs in os.walk(store_dir) for f in fs if f.endswith(".safetensors")]
        sizes["ours"] = sorted(os.path.getsize(p) for p in ours)
        real_cleanup(store, open_store, written, raw, *rest)

    monkeypatch.setattr(bench, "_cleanup", measure_then_clean)
    store_dir = tmp_path / "store"
    report = run_bench([str(store_dir)], kv_shape=(2, 2, 4, 2, 8), count=3, batch=4)
    assert report.errors == []
    assert sizes["raw"] and sizes["ours"]
    assert set(sizes["raw"]) == set(sizes["ours"])  # one size: header + payload, on both sides
    (put,) = [r for r in report.rows if r["op"] == "put"]
    assert put["raw_op"] == "write() header + payload"


def test_raw_file_reads_back_the_payload_past_the_header(tmp_path):
    import torch

    from lmcache_core.bench import _RawFile

    chunk = torch.arange(64, dtype=torch.float32)
    raw = _RawFile(str(tmp_path / "raw"), chunk.numel() * 4, header_bytes=300)
    raw.put(0, chunk)
    data = (tmp_path / "raw" / "0.bin").read_bytes()
    assert len(data) == 300 + 256 and data[300:] == chunk.numpy().tobytes()
    raw.get(0)
    assert torch.equal(raw._buf.view(torch.float32), chunk)
    raw.cleanup()


def test_a_run_restores_torchs_thread_count_and_records_its_own(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = run_bench(["cpu://"], kv_shape=(2, 2, 4, 2, 8), count=2, batch=2, torch_threads=1)
        assert report.params["torch_threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_zero_copy_is_measured_not_assumed(tmp_path):
    import torch

    from lmcache_core.bench import _serves_views
    from lmcache_core.storage_backend import open_backend
    from tests.conftest import make_key

    for url, views in (("cpu://", True), (str(tmp_path / "d"), False)):
        store = open_backend(url, dst_device="cpu")
        try:
            store.put(make_key(1), torch.ones(2, 2, 4, 2, 8))
            assert _serves_views(store, make_key(1)) is views, url
        finally:
            store.close()


def test_write_failures_count_a_hybrids_remote_too(tmp_path):
    """A hybrid counts only its own write failures: its remote storing none of its queued
    writes read as 0, so the bench timed writes that never reached the remote."""
    import torch

    from lmcache_core import LMCacheEngineConfig
    from lmcache_core.bench import _write_failures
    from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend
    from tests.conftest import make_key
    from tests.servers_redis import free_port

    cfg = LMCacheEngineConfig.from_defaults(
        local_device=None, local_disk=str(tmp_path), remote_url=f"redis://127.0.0.1:{free_port()}/0", remote_timeout=0.3
    )
    store = LMCHybridBackend(cfg, None, dst_device="cpu")
    for i in range(3):
        store.put(make_key(i), torch.ones(2, 2, 4, 2, 8), blocking=False)
    store.close()
    assert store.stats["background_put_failures"] == 0  # the hybrid's own counters miss them
    assert _write_failures(store) >= 3
