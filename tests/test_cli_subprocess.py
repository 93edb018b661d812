"""The installed `lmcache` script as a user runs it: real processes, real stores
(a disk directory, the test redis-server, the test S3 endpoint)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

KEY = "vllm@sub/model@1@0@" + "cd" * 32


def lmcache_exe() -> str:
    exe = Path(sys.executable).parent / "lmcache"
    found = str(exe) if exe.exists() else shutil.which("lmcache")
    if not found:
        pytest.fail("the `lmcache` console script is not installed (pip install -e .)")
    return found


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], code: int = 0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [lmcache_exe(), *args], env=env, capture_output=True, text=True, input=input, timeout=120
    )
    assert proc.returncode == code, f"lmcache {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# Runs the command in-process and reports at exit whether torch was imported.
_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('TORCH_LOADED=%s\\n' % ('torch' in sys.modules)))\n"
    "sys.argv = ['lmcache'] + sys.argv[1:]\n"
    "from lmcache_cli.main import main\n"
    "main()\n"
)


def torch_loaded(args: list[str], env: dict[str, str]) -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("TORCH_LOADED=")][-1]
    return line.endswith("True")


def tensor_file(path: Path, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file({"x": torch.randn(2, 2, 32, 4, 16, generator=gen).to(torch.bfloat16)}, str(path))
    return path


def test_default_store_roundtrip_and_exit_codes(tmp_path: Path) -> None:
    """put/ls/get on the default store (under XDG_CACHE_HOME), exit codes, one-line errors."""
    env = clean_env(tmp_path)
    default_store = tmp_path / "xdg" / "lmcache"
    src = tensor_file(tmp_path / "in.safetensors")
    empty = run(["ls"], env)
    assert empty.stdout.startswith("0 chunks") and "xdg/lmcache" in empty.stdout
    run(["put", KEY, str(src)], env)
    assert list(default_store.rglob("*.safetensors"))
    listing: Any = json.loads(run(["ls", "--format", "json", "--long"], env).stdout)
    assert listing["count"] == 1 and listing["chunks"][0]["key"] == KEY
    assert listing["chunks"][0]["shape"] == [2, 2, 32, 4, 16]
    out = tmp_path / "out.safetensors"
    run(["get", KEY, "-o", str(out)], env)
    assert torch.equal(load_file(str(out))["kv_chunk"], load_file(str(src))["x"])
    # errors: one line, no traceback; usage errors exit 2
    miss = run(["get", "vllm@x@1@0@ff", "-o", str(tmp_path / "miss.safetensors")], env, code=1)
    assert miss.stderr.count("\n") == 1 and "Traceback" not in miss.stderr
    bad = run(["ls", "--older-than", "soon"], env, code=2)
    assert bad.stderr.count("\n") == 1
    refused = run(["evict", "*"], env, code=1)
    assert "--yes" in refused.stderr
    assert run(["ls", "-q"], env).stdout.split() == [KEY]
    # LMCACHE_STORE and --store name other stores
    (tmp_path / "other").mkdir()  # an explicit store must exist for read-only commands
    env2 = clean_env(tmp_path, LMCACHE_STORE=str(tmp_path / "other"))
    assert json.loads(run(["stats", "--format", "json"], env2).stdout)["chunks"] == 0
    assert json.loads(run(["--store", str(default_store), "stats", "--format", "json"], env2).stdout)["chunks"] == 1


def test_debug_env_prints_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: zero\n")
    args = ["--config", str(bad), "ls"]
    plain = run(args, clean_env(tmp_path), code=1)
    assert "Traceback" not in plain.stderr and plain.stderr.startswith("error:") and "chunk_size" in plain.stderr
    debug = run(args, clean_env(tmp_path, LMCACHE_DEBUG="1"), code=1)
    assert "Traceback" in debug.stderr


def test_commands_without_tensors_do_not_import_torch(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    store = tmp_path / "store"
    _put_in_process(store, KEY, tensor_file(tmp_path / "in.safetensors"))
    (tmp_path / "p.json").write_text(json.dumps(list(range(300))))
    for args in (
        ["--help"],
        ["ls", "--help"],
        ["--version"],
        ["--store", str(store), "ls", "-l"],
        ["--store", str(store), "stats"],
        ["--store", str(store), "verify"],
        ["--store", str(store), "config"],
        ["--store", str(store), "evict", "--older-than", "1d", "--dry-run"],
        ["--store", str(store), "lookup", "--tokens", str(tmp_path / "p.json"), "--model", "m"],
    ):
        assert not torch_loaded(args, env), f"lmcache {' '.join(args)} imported torch"
    # the probe itself works: a command that moves tensors does load torch
    assert torch_loaded(["--store", str(store), "show", KEY], env)


def test_warm_through_redis_and_s3_and_back(tmp_path: Path, redis_server: Any, s3_server: Any) -> None:
    """put in a disk store, warm it to Redis, Redis -> S3, S3 -> another disk store,
    get back: the tensor and every chunk file are byte-identical."""
    env = clean_env(tmp_path)
    run_id = uuid.uuid4().hex[:8]
    disk_a, disk_b = tmp_path / "a", tmp_path / "b"
    redis_url = f"{redis_server.url}?prefix=cli-{run_id}:"
    s3_url = f"{s3_server.url(f'cli-{run_id}')}?endpoint_url={s3_server.endpoint_url}"
    tokens = tmp_path / "prompt.json"
    tokens.write_text(json.dumps(list(range(40))))
    kv = tmp_path / "kv.safetensors"
    save_file({"kv": torch.randn(2, 2, 40, 4, 16).to(torch.bfloat16)}, str(kv))
    prompt = ["--tokens", str(tokens), "--model", "sub/model", "--chunk-size", "16"]
    run(["--store", str(disk_a), "put", *prompt, "--kv", str(kv)], env)  # 3 chunks

    for src, dst in [(str(disk_a), redis_url), (redis_url, s3_url), (s3_url, str(disk_b))]:
        res = json.loads(run(["warm", "--from", src, "--to", dst, "--format", "json", "-j", "2"], env).stdout)
        assert (res["copied"], res["skipped"], res["failed"]) == (3, 0, 0), (src, dst, res)

    out = tmp_path / "out.safetensors"
    got = json.loads(run(["--store", str(disk_b), "get", *prompt, "-o", str(out), "--format", "json"], env).stdout)
    assert got["tokens"] == 40
    assert torch.equal(load_file(str(out))["kv"], load_file(str(kv))["kv"])
    files_a = {p.relative_to(disk_a): p.read_bytes() for p in disk_a.rglob("*.safetensors")}
    files_b = {p.relative_to(disk_b): p.read_bytes() for p in disk_b.rglob("*.safetensors")}
    assert len(files_a) == 3 and files_a == files_b
    assert "test-secret" not in run(["--store", s3_url + "&secret=lmcache-test-secret", "config"], env).stdout


def _put_in_process(store: Path, key: str, src: Path) -> None:
    """Fill a store without paying a subprocess's torch import."""
    from lmcache_core.key import CacheEngineKey
    from lmcache_core.storage_backend import open_backend

    with open_backend(str(store), dst_device="cpu") as backend:
        backend.put(CacheEngineKey.from_string(key), load_file(str(src))["x"])


def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`lmcache ls | head -1`: no error message, no traceback when the reader goes away."""
    from lmcache_core import layout
    from lmcache_core.key import CacheEngineKey

    store = tmp_path / "store"
    for i in range(2000):  # listing reads names and sizes only: empty files will do
        path = store / layout.key_to_path(CacheEngineKey("vllm", "m", 1, 0, f"{i:064x}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    proc = subprocess.Popen(
        [lmcache_exe(), "--store", str(store), "ls"], env=clean_env(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("KEY")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) in (0, 1)
    assert err == "", err


def _sigint_default() -> None:
    """In the child: Ctrl-C as a terminal delivers it. A test run started in the
    background by a non-interactive shell ignores SIGINT, and children inherit that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen[str]) -> float:
    """Send Ctrl-C; check the process ended with 130 and one `error: interrupted` line;
    the seconds it took to end."""
    import signal
    import time

    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    waited = time.monotonic() - sent
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    return waited


def test_ctrl_c_stops_warm_to_a_silent_server_at_once(tmp_path: Path) -> None:
    """Worker threads waiting on a server that never answers do not hold the exit:
    SIGINT ends the process with 130 and one `error: interrupted` line, at once."""
    import time

    from lmcache_core.key import CacheEngineKey
    from lmcache_core.storage_backend import open_backend
    from tests.tcp_proxy import TcpProxy

    src = tmp_path / "src"
    env = clean_env(tmp_path)
    with open_backend(str(src), dst_device="cpu") as backend:
        for i in range(6):
            backend.put(CacheEngineKey("vllm", "sub/model", 1, 0, f"{i:064x}"), torch.zeros(2, 2, 16, 2, 8))
    with TcpProxy(None, mode="blackhole") as proxy:  # accepts, never answers
        url = f"redis://:pw@127.0.0.1:{proxy.port}/0"
        proc = subprocess.Popen(
            [lmcache_exe(), "warm", "--from", str(src), "--to", url], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default,
        )  # fmt: skip
        time.sleep(2.0)  # well into the first calls' 5 s timeout
        assert proc.poll() is None
        waited = _interrupt(proc)
    assert waited < 3.0, f"exit took {waited:.1f}s after SIGINT"


def test_ctrl_c_ends_the_process_even_where_the_interrupt_is_swallowed(tmp_path: Path) -> None:
    """torch, importing NumPy from C, swallows an exception raised inside that import: a
    Ctrl-C landing there was lost, and warm ran to its end (exit 1, 12 s later). Here
    the code under the handler swallows the KeyboardInterrupt as torch did."""

    script = (
        "import sys, time\n"
        "from lmcache_cli.main import install_interrupt_handler\n"
        "install_interrupt_handler()\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    pass  # lost, as in torch's NumPy import\n"
        "time.sleep(30)\n"
        "sys.exit(0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=_sigint_default,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    waited = _interrupt(proc)
    assert waited < 10.0, f"exit took {waited:.1f}s after SIGINT"


def test_library_log_records_are_one_masked_prefixed_line_each(tmp_path: Path) -> None:
    """Python printed the library's warnings bare (no `warning:`), and asyncio's "Task
    exception was never retrieved" tracebacks (aiohttp after a reset) ran to 60 lines."""
    from tests.servers_redis import free_port

    cfg = tmp_path / "tiered.yaml"
    # A dead remote behind a disk tier: the put stores on disk, logs the remote's failure.
    cfg.write_text(f"local_disk: {tmp_path / 'd'}\nremote_url: redis://u:hunter2@127.0.0.1:{free_port()}/0\nremote_timeout: 0.5\n")
    args = ["--config", str(cfg), "put", "vllm@m@1@0@abcd", str(tensor_file(tmp_path / "k.safetensors"))]
    proc = run(args, clean_env(tmp_path), code=1)
    lines = proc.stderr.splitlines()
    # The remote's failure is said once, by the error line (its warning would repeat
    # it: tests/test_cli_refused_warning.py); the rest of what is logged is one line each.
    assert [ln for ln in lines if "remote put of vllm@m@1@0@abcd failed" in ln] == [lines[-1]], proc.stderr
    assert lines[-1].startswith("error: "), proc.stderr
    assert all(ln.startswith(("warning: ", "error: ", "stored ")) for ln in lines), proc.stderr
    assert "hunter2" not in proc.stderr and "Traceback" not in proc.stderr
    debug = run(args, clean_env(tmp_path, LMCACHE_DEBUG="1"), code=1)
    assert "debug: " in debug.stderr and "hunter2" not in debug.stderr  # everything, still masked


def test_asyncio_noise_is_left_out_unless_debugging(tmp_path: Path) -> None:
    probe = (
        "import logging, sys\n"
        "from lmcache_cli.log_lines import install_log_handler\n"
        "install_log_handler()\n"
        "try:\n"
        "    raise ConnectionResetError('reset by peer')\n"
        "except ConnectionResetError:\n"
        "    logging.getLogger('asyncio').error('Task exception was never retrieved', exc_info=True)\n"
        "logging.getLogger('lmcache_core.x').warning('circuit open for redis://u:pw@h/0')\n"
        "logging.getLogger('lmcache_core.x').debug('retrying GET')\n"
        "logging.getLogger('botocore.endpoint').debug('Authorization: AWS4-HMAC-SHA256 Credential=AKIASECRET')\n"
    )
    plain = subprocess.run([sys.executable, "-c", probe], env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert plain.stderr.splitlines() == ["warning: circuit open for redis://u:***@h/0"]
    debug = subprocess.run(
        [sys.executable, "-c", probe], env=clean_env(tmp_path, LMCACHE_DEBUG="1"), capture_output=True, text=True, timeout=60
    )
    assert "error: Task exception was never retrieved" in debug.stderr and "ConnectionResetError" in debug.stderr
    assert "debug: retrying GET" in debug.stderr
    # Other libraries' debug lines stay out: botocore's carry request headers with credentials.
    assert "AKIASECRET" not in debug.stderr
