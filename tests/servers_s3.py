"""A real S3 endpoint for the tests: moto's ThreadedMotoServer on a free loopback port.

This is how s3fs tests itself. ``s3_server`` (session) serves every S3 test;
``s3_server_private`` (function) is a second server on its own port for tests
that stop and restart it, so they never break the shared one. Moto keeps its
buckets in process memory, so a restarted server still has its objects.

Credentials are dummies given to the backends as options; while the session
server runs, ``AWS_*`` variables that are unset get dummy values too (so
``s3://`` URLs opened without options work), and are restored afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Iterator

import pytest

BUCKET = "lmcache-test"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "lmcache-test-key",
    "AWS_SECRET_ACCESS_KEY": "lmcache-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never ask an EC2 metadata service for credentials (a slow timeout off EC2).
    "AWS_EC2_METADATA_DISABLED": "true",
}

__all__ = ["BUCKET", "S3Server", "s3_server", "s3_server_private"]


class S3Server:
    """A moto S3 server on ``127.0.0.1`` that can be stopped and started again.

    ``stop()`` closes the listening socket, so clients get "connection refused"
    (not a hang); ``start()`` reopens it on the same port. Not thread-safe.
    """

    def __init__(self, bucket: str = BUCKET) -> None:
        self.bucket = bucket
        self.host = "127.0.0.1"
        self.port = 0
        self._moto: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def options(self) -> dict[str, Any]:
        """Connector options for ``LMCRemoteBackend``/``open_backend``."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": DUMMY_ENV["AWS_ACCESS_KEY_ID"],
            "secret": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
            "region": "us-east-1",
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    @property
    def running(self) -> bool:
        return self._moto is not None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if self._moto is not None:
            return
        if self.port:
            _wait_until_bindable(self.host, self.port)
        moto = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        moto.start()
        self._moto = moto
        self.port = moto.get_host_and_port()[1]
        self._ensure_bucket()

    def stop(self) -> None:
        if self._moto is None:
            return
        moto, self._moto = self._moto, None
        moto.stop()
        # ThreadedMotoServer.stop() leaves the socket listening: connections would
        # be accepted and never answered. Close it so the server is really gone.
        moto._server.server_close()

    def _ensure_bucket(self) -> None:
        import boto3

        client = boto3.client("s3", **_boto_options(self))
        try:
            client.create_bucket(Bucket=self.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        finally:
            client.close()

    def client(self, **config: Any) -> Any:
        """A plain boto3 client for planting raw objects in tests; ``config``: botocore ``Config`` options."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", config=Config(**config) if config else None, **_boto_options(self))


def _boto_options(server: S3Server) -> dict[str, Any]:
    return {
        "endpoint_url": server.endpoint_url,
        "aws_access_key_id": DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": "us-east-1",
    }


def _wait_until_bindable(host: str, port: int, timeout: float = 5.0) -> None:
    # ThreadedMotoServer binds on its own thread and waits forever if that
    # fails, so make sure the port is free (as werkzeug binds it) first.
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} stayed busy; cannot restart the S3 server") from None
        time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The shared S3 endpoint with bucket ``lmcache-test``; never stopped by tests."""
    # Imported, not importorskip'ed: both are in the test extra, and a broken install
    # must fail the run rather than skip every S3 test.
    import moto.server  # noqa: F401
    import s3fs  # noqa: F401

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    saved: dict[str, str | None] = {name: os.environ.get(name) for name in DUMMY_ENV}
    for name, value in DUMMY_ENV.items():
        os.environ.setdefault(name, value)
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@pytest.fixture
def s3_server_private(s3_server: S3Server) -> Iterator[S3Server]:
    """A second S3 endpoint on its own port, free to stop and start (same moto state)."""
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()
