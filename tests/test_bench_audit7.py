"""Regressions of the benchmark audit 7: the raw clients open what the store opens and stop
when it stops answering, an interrupted run removes what it wrote, cold reads are checked
cold, and the recorded command is the one that ran. Real servers; no timings asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from lmcache_core.bench import BenchTarget, _RawRedis, drop_page_cache, run_bench
from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata
from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend
from tests.tcp_proxy import TcpProxy
from tests.test_bench_docs import load_bench_script

ROOT = Path(__file__).resolve().parent.parent
TINY: dict[str, Any] = {"kv_shape": (4, 8), "count": 2, "batch": 1}


def _bench_keys(server: Any, password: str | None = None) -> list[bytes]:
    with server.client(password=password) as client:
        return sorted(client.scan_iter(match="*lmcache-bench*"))


def _fs_type(path: str) -> str | None:
    """The filesystem type of the mount holding ``path`` (Linux), or None."""
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _dev, mount, fstype = line.split()[:3]
                if os.path.realpath(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        return None
    return kind


# -- the raw Redis client opens what the store opens -----------------------------------------


def test_raw_redis_client_keeps_a_password_given_in_the_url_query(redis_server_factory) -> None:
    """The raw client dropped the whole query: the store authenticated with
    ``?password=``, redis-py's SET did not, and the bench failed with
    "AuthenticationError" for a URL every other command accepts."""
    server = redis_server_factory("--requirepass", "s3cr3t")
    url = f"redis://127.0.0.1:{server.port}/0?password=s3cr3t"
    report = run_bench([url], **TINY)
    assert report.errors == []
    assert {r["op"] for r in report.rows} >= {"put", "get"}
    assert "s3cr3t" not in json.dumps(report.to_dict())
    assert _bench_keys(server, password="s3cr3t") == []


def test_raw_redis_client_opens_a_unix_socket_url(redis_server_factory) -> None:
    """unix:///path/redis.sock became unix:/path/redis.sock on its way to the raw client,
    which refused it: "not a valid Redis URL"."""
    server = redis_server_factory(unixsocket=True)
    report = run_bench([server.unix_url], **TINY)
    assert report.errors == []
    assert {r["op"] for r in report.rows} >= {"put", "get"}


def test_a_raw_set_whose_reply_came_too_late_is_still_removed(redis_server_factory) -> None:
    """The raw client recorded a key only once its SET was answered: a SET the busy
    server stored after the client gave up (a timeout, Ctrl-C) was left in the store."""
    server = redis_server_factory("--enable-debug-command", "yes")
    raw = _RawRedis(server.url, "audit7", 0.3)
    raw.get(0)  # connected: the SET below is sent, then waits for its reply
    with server.client() as busy:
        sleeper = threading.Thread(target=busy.execute_command, args=("DEBUG", "SLEEP", "1.5"))
        sleeper.start()
        try:
            threading.Event().wait(0.2)  # the server is asleep now
            with pytest.raises(Exception):  # noqa: B017 - redis-py's timeout type varies by version
                raw.put(0, torch.ones(8))
        finally:
            sleeper.join()
    assert _bench_keys(server) == [b"lmcache-bench-raw:audit7:0"]  # stored after all
    raw.cleanup()
    assert _bench_keys(server) == []


# -- a dead S3 endpoint ends the run ---------------------------------------------------------


def test_a_blackholed_s3_endpoint_ends_the_run_with_an_error(s3_server) -> None:
    """The raw s3fs client had botocore's 60 s timeouts, retried, and s3fs's own retries:
    `lmcache bench` on an endpoint that accepted connections and never answered was
    still waiting 150 s later. It now has the store's timeout (``remote_timeout``)."""
    done: dict[str, Any] = {}
    with TcpProxy(None, mode="blackhole") as proxy:
        url = "s3://lmcache-test/audit7-dead"
        opts = {**s3_server.options, "endpoint_url": f"http://127.0.0.1:{proxy.port}", "remote_timeout": 0.5}

        def run() -> None:
            done["report"] = run_bench([url], options={url: opts}, **TINY)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(60)  # a bound on a hang, not a timing: the run takes ~2 s
        assert not worker.is_alive(), "bench still waiting on a blackholed endpoint"
    report = done["report"]
    assert report.rows == []
    (err,) = report.errors
    assert "TimeoutError" in err["error"] and "no answer within" in err["error"] and "\n" not in err["error"]


# -- an interrupted run removes what it wrote -------------------------------------------------


class _GetInterrupted(LMCLocalDiskBackend):
    """A real disk store whose first get is interrupted (Ctrl-C), after its put landed."""

    interrupted = False

    def get(self, key: Any) -> Any:
        if not _GetInterrupted.interrupted:
            _GetInterrupted.interrupted = True
            raise KeyboardInterrupt
        return super().get(key)


def test_a_warm_up_interrupted_after_its_put_leaves_no_chunk(tmp_path: Path) -> None:
    """Each phase's warm-up chunk was recorded for removal only after its put and get:
    Ctrl-C between them (reproduced at 3.5 s into `lmcache bench` on a directory) left
    a `lmcache-bench-*` chunk in the user's store."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "keep.txt").write_text("the user's")

    def open_store(meta: LMCacheEngineMetadata, capacity: int) -> LMCLocalDiskBackend:
        cfg = LMCacheEngineConfig.from_defaults(
            local_device=None, local_disk=str(store_dir), max_local_disk_size=1.0
        )
        return _GetInterrupted(cfg, meta, "cpu")

    _GetInterrupted.interrupted = False
    target = BenchTarget(name=str(store_dir), open=open_store, kind="disk", raw_url=str(store_dir))
    with pytest.raises(KeyboardInterrupt):
        run_bench([target], **TINY)
    assert _GetInterrupted.interrupted
    left = sorted(
        os.path.relpath(os.path.join(d, f), store_dir) for d, _, fs in os.walk(store_dir) for f in fs
    )
    assert left == ["keep.txt"]
    assert sorted(os.listdir(store_dir)) == ["keep.txt"]


def test_ctrl_c_leaves_the_cleanup_of_a_slow_remote_store_time_to_finish(
    redis_server, private_cli_env
) -> None:
    """`lmcache bench` stopped by Ctrl-C removed its chunks one at a time and the CLI
    ended the process 2 s after Ctrl-C: on a store 30 ms away, 67 chunks and raw
    objects were left in the user's S3 prefix. Here the server is 0.3 s away."""
    assert _bench_keys(redis_server) == []
    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        cmd = [sys.executable, "-c", "from lmcache_cli.main import main; main()", "bench",
               "-s", f"redis://127.0.0.1:{proxy.port}/0", "-n", "16", "--batch", "16", "--chunk-mb", "0.01"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            seen = []
            for line in proc.stderr:
                seen.append(line)
                if ": get x" in line:
                    break
            else:
                pytest.fail("bench never reached its get phase: " + "".join(seen)[-2000:])
            proxy.set_mode("delay", delay=0.3)  # the reads (and the cleanup after them) slow down
            threading.Event().wait(0.3)
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, err[-2000:]
        assert "interrupted" in err
    assert _bench_keys(redis_server) == []


# -- cold reads are checked cold --------------------------------------------------------------


def test_resident_fraction_sees_a_drop_of_the_page_cache(tmp_path: Path) -> None:
    if _fs_type(str(tmp_path)) in ("tmpfs", "ramfs", None):
        pytest.skip("needs a disk-backed filesystem under tmp_path")
    from lmcache_core.bench import resident_fraction

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    assert resident_fraction([str(path)]) == pytest.approx(1.0)
    drop_page_cache([str(path)])
    assert resident_fraction([str(path)]) == pytest.approx(0.0, abs=0.05)


@pytest.mark.skipif(_fs_type("/dev/shm/x") != "tmpfs", reason="needs /dev/shm on tmpfs")
def test_get_cold_on_tmpfs_is_not_reported_as_cold() -> None:
    """tmpfs keeps every page whatever posix_fadvise asks: `lmcache bench -s /dev/shm/...`
    reported hot reads (100 % of the pages in memory, checked with fincore) as
    get_cold, "page cache dropped via posix_fadvise", beside "cold file" raw reads."""
    import tempfile

    store = tempfile.mkdtemp(prefix="lmcache-audit7-", dir="/dev/shm")
    try:
        report = run_bench([store], kv_shape=(1 << 16,), count=2, batch=1)
        assert report.errors == []
        (cold,) = [r for r in report.rows if r["op"] == "get_cold"]
        assert cold["cold"] is False and cold["resident_pct"] > 90
        assert cold["note"].startswith("NOT cold") and "cold file" not in cold["raw_op"]
    finally:
        import shutil

        shutil.rmtree(store, ignore_errors=True)


def test_get_cold_on_a_disk_is_cold(tmp_path: Path) -> None:
    if _fs_type(str(tmp_path)) in ("tmpfs", "ramfs", None):
        pytest.skip("needs a disk-backed filesystem under tmp_path")
    report = run_bench([str(tmp_path / "store")], kv_shape=(1 << 16,), count=2, batch=1)
    (cold,) = [r for r in report.rows if r["op"] == "get_cold"]
    assert cold["cold"] is True and cold["resident_pct"] <= 10
    assert "cold file" in cold["raw_op"]


# -- the disk store a run creates goes again --------------------------------------------------


def test_a_store_directory_the_run_created_is_removed(tmp_path: Path) -> None:
    """`lmcache bench -s /tmp/nx/a/b` left /tmp/nx/a/b behind (empty directories the
    run had created), also when the store could not be benchmarked."""
    report = run_bench([str(tmp_path / "new" / "a" / "b")], **TINY)
    assert report.errors == [] and report.rows
    assert os.listdir(tmp_path) == []

    def broken(meta: LMCacheEngineMetadata, capacity: int) -> Any:
        raise ConnectionError("nobody home")

    target = BenchTarget(name="x", open=broken, kind="disk", raw_url=str(tmp_path / "other" / "c"))
    report = run_bench([target], **TINY)
    assert report.errors
    assert os.listdir(tmp_path) == []


def test_a_run_keeps_a_store_directory_that_was_there(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    report = run_bench([str(store_dir)], **TINY)
    assert report.errors == []
    assert os.listdir(tmp_path) == ["store"] and os.listdir(store_dir) == []


# -- scripts/bench.py records the command that ran --------------------------------------------


@pytest.fixture(scope="module")
def bench_script() -> Any:
    return load_bench_script("bench_script_audit7")


def test_the_recorded_command_masks_an_option_given_with_equals(bench_script, tmp_path: Path) -> None:
    """mask_url on "--redis=redis://:pw@h:1/0" returned "://-redis=redis://:***@h:1/0":
    the JSON's (and BENCHMARKS.md's) command was not the one that ran."""
    out = tmp_path / "bench.json"
    argv = ["--only", "memory", "--sizes", "0.0078125", "--count", "2", "--batch", "1", "--dir", str(tmp_path),
            "--no-docs", "--json", str(out), "--redis=redis://:hunter2@127.0.0.1:1/0"]  # fmt: skip
    assert bench_script.main(argv) == 0
    command = json.loads(out.read_text())["command"]
    assert "hunter2" not in command
    assert command.endswith(" --redis=redis://:***@127.0.0.1:1/0")
    assert command.startswith("python scripts/bench.py --only memory ")


def test_the_targets_table_does_not_judge_reads_that_were_not_cold(bench_script) -> None:
    row = {"store": "disk (/dev/shm)", "op": "get_cold", "kind": "disk", "gbps": 9.0, "raw_gbps": 9.5,
           "ratio": 0.95, "note": "NOT cold", "cold": False}  # fmt: skip
    table = bench_script.targets_table([row])
    (line,) = [ln for ln in table.splitlines() if ln.startswith("| disk cold get")]
    assert "not measured" in line and "| - |" in line
    merged = bench_script.merge([{"rows": [dict(row, cold=True)]}, {"rows": [row]}])
    assert merged[0]["cold"] is False


# -- scripts/bench_scale.py times what it names ------------------------------------------------


def test_every_put_timed_as_put_plus_evict_evicts(tmp_path: Path) -> None:
    """The budget's slack held one (disk) or two (memory) chunks more than N, so the first
    "put + evict" samples evicted nothing: 48 evictions for 50 timed puts."""
    spec = importlib.util.spec_from_file_location("bench_scale_audit7", ROOT / "scripts" / "bench_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "scale.json"
    assert module.main(["--sizes", "60", "--samples", "20", "--dir", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["store"] for r in rows} == {"memory", "disk"}
    for row in rows:
        assert row["evictions"] == 20, row
