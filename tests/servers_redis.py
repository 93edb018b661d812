"""Real ``redis-server`` processes for the tests, on free loopback ports.

Fixtures:
    ``redis_server``: one server for the whole session (tests isolate by key prefix).
    ``redis_server_private``: a fresh server per test, for tests that kill, restart,
        fill or reconfigure it.
    ``redis_server_factory``: ``start(*extra_args, unixsocket=False)`` starts more;
        all are stopped when the test ends.
    ``redis_cluster``: a 3-master Redis Cluster for the session (``.url`` is
        ``redis+cluster://127.0.0.1:<port>``).

Servers keep nothing on disk (``--save "" --appendonly no``) and run in temp dirs.
A missing ``redis-server`` fails the test with a message to run ``scripts/test.sh``
(which installs it): Redis tests are never skipped silently.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

__all__ = [
    "RedisCluster",
    "RedisServer",
    "redis_cluster",
    "redis_server",
    "redis_server_factory",
    "redis_server_private",
]

START_TIMEOUT = 15.0
_MISSING = (
    "redis-server is not installed: run scripts/test.sh, which installs Debian's "
    "redis-server package, or `sudo apt-get install redis-server`"
)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(_MISSING, pytrace=False)
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster_bus: bool = False) -> int:
    """A free loopback port; with ``cluster_bus`` also ``port + 10000`` (Redis Cluster's bus)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55000)
        if _port_free(port) and (not cluster_bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:<port>`` in its own directory.

    Not thread-safe (tests drive it from one thread).
    """

    def __init__(self, workdir: Path, *extra_args: str, unixsocket: bool = False, cluster: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.cluster = cluster
        self.unixsocket = str(self.workdir / "redis.sock") if unixsocket else None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        assert self.unixsocket, "started without unixsocket=True"
        return f"unix://{self.unixsocket}"

    def start(self) -> RedisServer:
        """Start on a free port (or the same port again after ``kill``/``stop``)."""
        attempts = 1 if self.port else 5
        last = ""
        for _ in range(attempts):
            if not self.port:
                self.port = free_port(cluster_bus=self.cluster)
            try:
                self._spawn()
                return self
            except RuntimeError as exc:  # port taken between the check and the bind
                last = str(exc)
                self.port = 0 if attempts > 1 else self.port
        raise RuntimeError(last)

    def _spawn(self) -> None:
        args = [
            _binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log),
            "--daemonize", "no",
        ]
        if self.unixsocket:
            args += ["--unixsocket", self.unixsocket, "--unixsocketperm", "700"]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
            ]
        args += self.extra_args
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on port {self.port} exited: {err}{self._log_tail()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return ""

    def client(self, **kwargs: Any) -> Any:
        """A plain redis-py client on the TCP port (``redis.Redis``); close it after use."""
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5, **kwargs
        )

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        # NOAUTH: a server with requirepass is up too; LOADING and the like are not ready.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def flush(self) -> None:
        with self.client() as c:
            c.flushall()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> RedisServer:
        """Kill (if alive) and start again on the same port, empty."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()


class RedisCluster:
    """Three masters, no replicas, every slot assigned. Not thread-safe."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(Path(workdir) / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = _binary("redis-cli")
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        res = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )
        if res.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {res.stdout.decode()} {res.stderr.decode()}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self._state_ok(n) for n in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("Redis Cluster did not reach cluster_state:ok")

    @staticmethod
    def _state_ok(node: RedisServer) -> bool:
        try:
            with node.client() as c:
                info = c.execute_command("CLUSTER", "INFO")
        except Exception:  # noqa: BLE001 - not up yet
            return False
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server shared by the session; isolate tests by key prefix."""
    with tempfile.TemporaryDirectory(prefix="lmcache-redis-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``start(*extra_args, unixsocket=False)`` -> a new private server, stopped at test end."""
    started: list[RedisServer] = []

    def start(*extra_args: str, unixsocket: bool = False) -> RedisServer:
        # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
        workdir = Path(tempfile.mkdtemp(prefix="lmc-rs-")) if unixsocket else tmp_path / f"redis{len(started)}"
        server = RedisServer(workdir, *extra_args, unixsocket=unixsocket)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        if server.unixsocket:
            shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def redis_server_private(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A redis-server of this test's own: kill, restart, fill or reconfigure it freely."""
    return redis_server_factory()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster on loopback, shared by the session."""
    with tempfile.TemporaryDirectory(prefix="lmcache-rcluster-") as tmp:
        cluster = RedisCluster(Path(tmp))
        try:
            yield cluster.start()
        finally:
            cluster.stop()

