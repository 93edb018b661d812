"""Throwaway servers for the benchmark scripts: redis-server and moto's S3 server.

Each runs in its own process on a free loopback port (in ours, moto would
compete for our GIL and skew every S3 figure) and is stopped on exit from its
``with`` block. Shared by ``bench.py``, ``bench_remote.py`` and ``bench_hybrid.py``; not thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

# Dummy credentials for moto; they replace the environment's while it serves, so
# s3:// URLs opened without options authenticate too (and no real credential is
# ever sent to it).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "lmcache-bench",
    "AWS_SECRET_ACCESS_KEY": "lmcache-bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    """Return once ``port`` accepts connections; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


# URL (or endpoint) -> pid of the server serving it, while it serves: the benchmark
# reports the CPU time a server spends (see lmcache_core.bench.BenchTarget.server_pid).
_pids: dict[str, int] = {}


def pid_of(url: str) -> int | None:
    """The pid of the server this module started for ``url`` (as yielded), or None."""
    return _pids.get(url)


@contextlib.contextmanager
def _serving(
    cmd: list[str], port: int, what: str, env: dict[str, str] | None = None, *, url: str = ""
) -> Iterator[None]:
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        wait_port(port, proc, what)
        if url:
            _pids[url] = proc.pid
        yield
    finally:
        _pids.pop(url, None)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


@contextlib.contextmanager
def redis_server(hint: str = "pass --redis URL") -> Iterator[str]:
    """A redis-server without persistence; yields its ``redis://`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(f"redis-server not found (apt-get install redis-server, or {hint})")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="lmcache-bench-redis-")
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", workdir, "--protected-mode", "no", "--proto-max-bulk-len", "1gb"]  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        with _serving(cmd, port, "redis-server", url=url):
            yield url
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server; yields its endpoint URL.

    Meanwhile this process's AWS variables are replaced: ``S3_ENV`` set, a session
    token and profile (which would pair real credentials with the dummies) unset.
    All are restored on exit.
    """
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    saved = {k: os.environ.get(k) for k in (*S3_ENV, *_UNSET)}
    for k in _UNSET:
        os.environ.pop(k, None)
    os.environ.update(S3_ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        with _serving([*cmd, "-H", "127.0.0.1", "-p", str(port)], port, "moto_server", dict(os.environ), url=url):
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` at ``endpoint`` (an existing one is fine); credentials from the environment."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=bucket)
    finally:
        client.close()
