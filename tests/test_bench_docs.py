"""scripts/bench.py's report writer: docs/BENCHMARKS.md from a report, checked section by
section on a made-up report (the figures are input here, not results)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIB32 = str(32 * 2**20)


@pytest.fixture(scope="module")
def bench_script() -> Any:
    return load_bench_script("bench_script_under_test")


def load_bench_script(name: str) -> Any:
    """``scripts/bench.py`` imported as module ``name``."""
    sys.path.insert(0, str(ROOT / "scripts"))  # the script imports bench_servers from there
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "bench.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _row(kind: str, store: str, op: str, ratio: float, gbps: float, **extra: Any) -> dict[str, Any]:
    return {
        "store": store, "op": op, "gbps": gbps, "p50_ms": 1.0, "p99_ms": 2.0, "raw_op": "raw",
        "raw_gbps": gbps / ratio, "ratio": ratio, "kind": kind, "chunk_bytes": int(MIB32), "samples": 16,
        "note": extra.pop("note", ""), "ratio_min": ratio * 0.9, "ratio_max": ratio * 1.1, "runs": 3, **extra,
    }  # fmt: skip


def _report() -> dict[str, Any]:
    rows = [
        _row("memory", "memory (cpu://)", "put", 1.08, 15.9),
        _row("memory", "memory (cpu://)", "get", 131.0, 2228.0, note="zero-copy (returns a view of the cache)"),
        _row("disk", "disk (/d)", "put", 1.03, 0.41),
        _row("disk", "disk (/d)", "put_nonblocking", 1.72, 5.2),
        _row("disk", "disk (/d)", "get", 1.19, 10.4),
        _row("disk", "disk (/d)", "get_cold", 0.62, 1.1),  # below its 0.8 target
        _row("redis", "redis (loopback)", "put", 1.10, 1.72),
        _row("redis", "redis (loopback)", "put_nonblocking", 1.51, 1.73),
        _row("redis", "redis (loopback)", "get", 2.71, 1.09),
        _row("fsspec", "s3 (moto)", "put", 0.98, 0.18),
        _row("fsspec", "s3 (moto)", "get", 1.6, 0.85),
        # Below 2x, with the CPU bound the run measured: the table must say so.
        _row("fsspec", "s3 (moto)", "batched_get[16]", 1.7, 1.13, cpu_best_ratio=1.85,
             cpu={"best_ratio": 1.8, "best_ratio_at_sequential_cpu": 2.6, "raw_client_cpu_s": 0.5,
                  "raw_server_cpu_s": 0.4, "raw_wall_s": 1.2, "client_cpu_s": 0.6, "server_cpu_s": 0.7,
                  "wall_s": 0.7, "summary": "CPU s ..."}),
    ]  # fmt: skip
    return {
        "command": "python scripts/bench.py --repeat 3",
        "docs_command": "python scripts/bench.py --docs-from r.json",
        "date": "2026-11-29 13:00 UTC",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5, "os": "Linux", "python": "3.11", "torch": "2"},
        "repeat": 3,
        "load_avg_at_start": [0.5, 0.4, 0.3],
        "note": "an idle VM",
        "sizes": {MIB32: {"kv_shape": [32, 2, 256, 8, 128], "rows": rows, "errors": []}},
    }


def _table_line(text: str, first_cell: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_benchmarks_md_has_every_section_and_judges_each_target(bench_script, tmp_path: Path) -> None:
    bench_script.write_docs(_report(), tmp_path)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in ("# Benchmarks", "## 32 MiB chunks, bf16, shape [32, 2, 256, 8, 128]",
                    "## Targets (32 MiB reference workload)", "## Against LMCache 0.5.6",
                    "## What the CPU allows", "## Noise"):  # fmt: skip
        assert heading in text, heading
    assert "`python scripts/bench.py --repeat 3`; these docs written by `python scripts/bench.py --docs-from" in text
    assert "* **Conditions**: an idle VM" in text
    # Targets: the ratio, its spread, and yes/no against each bound.
    redis_put = "Redis put >= 0.9x redis-py SET"
    assert _table_line(text, redis_put) == [redis_put, "1.10 (0.99-1.21)", "yes"]
    assert _table_line(text, "disk cold get >= 0.8x raw cold readinto")[2] == "no"
    assert _table_line(text, "memory get zero-copy or >= 0.8x warm copy_")[2] == "yes"
    s3_batch = _table_line(text, "S3 batched_get of 16 >= 2x sequential cat_file")
    assert s3_batch[2] == "no" and "the CPU allows at most 1.85 here" in s3_batch[1]
    # LMCache's published figures against ours (GB/s), both of its Redis clients.
    redis_py, native = [ln for ln in text.splitlines() if ln.startswith("| redis | put_nonblocking |")]
    assert "redis-py" in redis_py and redis_py.rstrip(" |").endswith("yes")  # 1.73 >= 0.66
    assert "native C++" in native and native.rstrip(" |").endswith("yes")  # 1.73 >= 0.96
    (disk_nb,) = [ln for ln in text.splitlines() if ln.startswith("| disk | put_nonblocking |")]
    assert disk_nb.rstrip(" |").endswith("yes")  # 5.2 GB/s >= 4.7
    (cold,) = [ln for ln in text.splitlines() if ln.startswith("| disk | get_cold |")]
    assert cold.rstrip(" |").endswith("no")  # 1.1 GB/s < 1.6
    # The CPU section lists the batched row with its bound.
    assert "| s3 (moto) | 32 MiB | 1.70 | 1.85 | 2.60 | 0.5 + 0.4 in 1.2 s | 0.6 + 0.7 in 0.7 s |" in text


def test_a_report_without_32_mib_rows_has_no_reference_tables(bench_script, tmp_path: Path) -> None:
    report = _report()
    report["sizes"] = {str(2 * 2**20): {**report["sizes"][MIB32], "kv_shape": [32, 2, 16, 8, 128]}}
    bench_script.write_docs(report, tmp_path)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## 2 MiB chunks" in text and "## Targets at 2 MiB" in text
    assert "## Targets (32 MiB" not in text and "## Against LMCache" not in text


@pytest.mark.parametrize("disk_get_ratio", [0.52, 0.85])
def test_small_chunk_targets_are_judged_and_a_missed_disk_get_explained(
    bench_script, tmp_path: Path, disk_get_ratio: float
) -> None:
    report = _report()
    small_rows = [
        {**r, "ratio": disk_get_ratio, "checksum_ceiling": 0.71} if (r["kind"], r["op"]) == ("disk", "get") else r
        for r in report["sizes"][MIB32]["rows"]
    ]
    report["sizes"][str(2 * 2**20)] = {"kv_shape": [32, 2, 16, 8, 128], "rows": small_rows, "errors": []}
    bench_script.write_docs(report, tmp_path)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    section = text.split("## Targets at 2 MiB", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln for ln in section.splitlines() if ln.startswith("| disk get >= 0.8x")]
    assert line.rstrip(" |").endswith("no" if disk_get_ratio < 0.8 else "yes")
    assert ("The disk get verifies its checksum" in section) == (disk_get_ratio < 0.8)
    # ...by the ceiling measured in the same run, not a figure written into the script.
    assert ("ran at 0.71x `readinto` alone" in section) == (disk_get_ratio < 0.8)
    # The 32 MiB table judges its own rows, not the 2 MiB ones.
    reference = text.split("## Targets (32 MiB", 1)[1].split("\n## ", 1)[0]
    (ref,) = [ln for ln in reference.splitlines() if ln.startswith("| disk get >= 0.8x")]
    assert ref.rstrip(" |").endswith("yes")


def test_s3_batching_is_also_judged_against_the_stores_own_sequential_gets(bench_script, tmp_path: Path) -> None:
    """A batched_get ratio against raw sequential reads includes each get's lead over the raw
    client; the stricter line judges what batching itself gains."""
    report = _report()
    for row in report["sizes"][MIB32]["rows"]:
        if row["op"] == "batched_get[16]":
            row["own_sequential_ratio"] = 1.27
    bench_script.write_docs(report, tmp_path)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert _table_line(text, "S3 batched_get of 16 >= 2x this store's own sequential gets") == [
        "S3 batched_get of 16 >= 2x this store's own sequential gets", "1.27", "no",
    ]  # fmt: skip
