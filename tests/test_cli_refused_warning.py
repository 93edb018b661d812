"""A command that fails because its store refused (a denied password, a server down,
an open circuit) says so in its one ``error:`` line, with the store's own words; the
library's ``warning:`` that said the same before it is left out. Warnings about other
things still appear, and ``LMCACHE_DEBUG=1`` keeps every line.

Real processes (the ``lmcache`` script, whose log handler this is) against a real
redis-server with a password, and a port where nothing listens.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from lmcache_cli import log_lines
from lmcache_cli.log_lines import HoldingHandler, is_store_failure
from lmcache_core.errors import StoreDeniedError
from tests.servers_redis import RedisServer, free_port
from tests.test_cli_subprocess import clean_env, run

KEY = "vllm@m@1@0@" + "ab" * 32
CHUNK = 16


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    chunk, kv, prompt = tmp_path / "chunk.safetensors", tmp_path / "kv.safetensors", tmp_path / "prompt.json"
    save_file({"t": torch.randn(2, 2, CHUNK, 4, 8)}, str(chunk))
    save_file({"t": torch.randn(2, 2, 6 * CHUNK, 4, 8)}, str(kv))
    prompt.write_text(json.dumps(list(range(6 * CHUNK))))
    return {"chunk": str(chunk), "kv": str(kv), "prompt": str(prompt)}


@pytest.fixture
def denied_url(redis_server_factory: Callable[..., RedisServer]) -> str:
    server = redis_server_factory("--requirepass", "right-pw")
    return f"redis://:wrong-pw@127.0.0.1:{server.port}/0"


def _only_the_error(stderr: str) -> str:
    lines = stderr.splitlines()
    assert not [ln for ln in lines if ln.startswith("warning:")], stderr
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "wrong-pw" not in stderr
    return errors[0]


@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["get", KEY, "-o", "{tmp}/out.safetensors"],
        ["show", KEY],
        ["put", KEY, "{chunk}"],
        ["put", "--tokens", "{prompt}", "--kv", "{kv}", "-m", "m", "--chunk-size", str(CHUNK)],
        ["lookup", "--tokens", "{prompt}", "-m", "m", "--chunk-size", str(CHUNK)],
        ["get", "--tokens", "{prompt}", "-m", "m", "--chunk-size", str(CHUNK), "-o", "{tmp}/p.safetensors"],
    ],
    ids=["ls", "get", "show", "put", "put-tokens", "lookup", "get-tokens"],
)
def test_a_denied_password_is_one_error_line_that_says_why(
    command: list[str], denied_url: str, files: dict[str, str], tmp_path: Path
) -> None:
    args = [part.format(tmp=tmp_path, **files) for part in command]

    proc = run(["--store", denied_url, *args], clean_env(tmp_path), code=1)

    error = _only_the_error(proc.stderr)
    assert "authentication failed" in error, error  # the store's words, which the warning had
    assert "redis://:***@127.0.0.1" in error


def test_a_denied_warm_destination_is_one_error_line(denied_url: str, files: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "src"
    env = clean_env(tmp_path)
    run(["--store", str(src), "put", KEY, files["chunk"]], env)

    proc = run(["warm", "--from", str(src), "--to", denied_url], env, code=1)

    error = _only_the_error(proc.stderr)
    assert "1 chunk failed to copy" in error and "authentication failed" in error, error


def test_a_server_down_whose_circuit_opens_is_one_error_line(files: dict[str, str], tmp_path: Path) -> None:
    """Six chunks to a port where nothing listens: the breaker opens (the library warns
    "circuit open") and the command fails; only the error line is printed."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    args = ["--store", down, "put", "--tokens", files["prompt"], "--kv", files["kv"], "-m", "m", "--chunk-size", str(CHUNK)]

    proc = run(args, clean_env(tmp_path), code=1)

    assert "Connection refused" in _only_the_error(proc.stderr)


def _tiered(tmp_path: Path, remote_url: str, extra: str = "") -> str:
    config = tmp_path / "tiered.yaml"
    config.write_text(f"local_disk: {tmp_path / 'disk'}\nremote_url: '{remote_url}'\nremote_timeout: 1\n{extra}")
    (tmp_path / "disk").mkdir(exist_ok=True)
    return str(config)


def test_a_tiered_put_the_remote_refused_names_the_cause_in_its_error(files: dict[str, str], tmp_path: Path) -> None:
    config = _tiered(tmp_path, f"redis://127.0.0.1:{free_port()}/0")

    proc = run(["--config", config, "put", KEY, files["chunk"]], clean_env(tmp_path), code=1)

    error = _only_the_error(proc.stderr)
    assert "not stored in remote" in error and "Connection refused" in error, error


def test_warnings_about_other_things_still_appear_on_a_failing_command(files: dict[str, str], tmp_path: Path) -> None:
    config = _tiered(tmp_path, f"redis://127.0.0.1:{free_port()}/0", extra="save_decode_cache: true\n")

    proc = run(["--config", config, "put", KEY, files["chunk"]], clean_env(tmp_path), code=1)

    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "save_decode_cache" in warnings[0], proc.stderr  # the config's, not the store's
    assert proc.stderr.splitlines()[-1].startswith("error:") and "Connection refused" in proc.stderr


def test_lmcache_debug_keeps_the_stores_warning(denied_url: str, tmp_path: Path) -> None:
    proc = run(["--store", denied_url, "ls"], clean_env(tmp_path, LMCACHE_DEBUG="1"), code=1)

    assert "warning:" in proc.stderr and "refused" in proc.stderr, proc.stderr
    assert "wrong-pw" not in proc.stderr


# -- the handler itself ------------------------------------------------------------------------


def _record(name: str, msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_held_store_warnings_about_a_store_the_error_names_are_dropped_the_rest_kept() -> None:
    stream = io.StringIO()
    handler = HoldingHandler(stream, debug=False)
    a, b = "redis://:pw@a:6379/0", "s3://bucket/p"
    handler.handle(_record("lmcache_core.storage_backend.remote_backend", "%s: %s refused: %s (such refusals are logged once a minute)",
                           "redis://:***@a:6379/0", "get", "redis://:***@a:6379/0: GET: denied"))  # fmt: skip
    handler.handle(_record("lmcache_core.storage_backend.circuit", "%s: %d consecutive failures, circuit open", b, 5))
    handler.handle(_record("lmcache_core.config", "config field %s is not used; ignored", "save_decode_cache"))
    assert stream.getvalue() == "warning: config field save_decode_cache is not used; ignored\n"  # not held

    assert handler.held_cause(f"store unavailable: {a}: could not ask") == "get refused: GET: denied"
    handler.release_held(f"access denied: {a}: GET: denied")

    lines = stream.getvalue().splitlines()
    assert lines[1:] == [f"warning: {b}: 5 consecutive failures, circuit open"]  # another store: kept
    handler.release_held(None)
    assert len(stream.getvalue().splitlines()) == 2  # released once


def test_a_successful_command_prints_what_was_held() -> None:
    stream = io.StringIO()
    handler = HoldingHandler(stream, debug=False)
    exc = StoreDeniedError("redis://h:1/0", "GET: denied")
    handler.handle(_record("lmcache_core.storage_backend.hybrid_backend", "remote get of %s failed: %s", "k", exc))
    assert stream.getvalue() == ""

    handler.release_held(None)

    assert stream.getvalue() == "warning: remote get of k failed: redis://h:1/0: GET: denied\n"


def test_what_counts_as_a_store_failure() -> None:
    store = "lmcache_core.storage_backend.local_backend"
    assert is_store_failure(_record(store, "tier put of %s failed: %s", "k", OSError(28, "No space left")))
    assert not is_store_failure(_record(store, "corrupt chunk %s removed: %s", "p", ValueError("bad checksum")))
    assert not is_store_failure(_record(store, "close gave up: %s", OSError("x"), level=logging.ERROR))
    assert not is_store_failure(_record("lmcache_core.config", "x %s", OSError("x")))


def test_debug_holds_nothing() -> None:
    stream = io.StringIO()
    handler = HoldingHandler(stream, debug=True)
    handler.handle(_record("lmcache_core.storage_backend.circuit", "%s: circuit open", "redis://h:1/0"))
    assert "circuit open" in stream.getvalue()


def test_a_store_named_like_another_is_not_taken_for_it() -> None:
    """URLs are compared whole: an error about s3://bucket/p2 says nothing of s3://bucket/p."""
    stream = io.StringIO()
    handler = HoldingHandler(stream, debug=False)
    handler.handle(_record("lmcache_core.storage_backend.remote_backend", "%s: %s refused: %s", "s3://bucket/p", "list", "AccessDenied"))  # fmt: skip
    assert handler.held_cause("store unavailable: s3://bucket/p2: put: timed out") is None
    handler.release_held("store unavailable: s3://bucket/p2: put: timed out")
    assert stream.getvalue() == "warning: s3://bucket/p: list refused: AccessDenied\n"


def test_a_breakers_recovery_line_is_never_given_as_the_cause() -> None:
    stream = io.StringIO()
    handler = HoldingHandler(stream, debug=False)
    url = "redis://h:6379/0"
    handler.handle(_record("lmcache_core.storage_backend.circuit", "%s: %d consecutive failures, circuit open", url, 5))
    handler.handle(_record("lmcache_core.storage_backend.circuit", "%s: remote answered again, circuit closed", url))
    assert handler.held_cause(f"could not ask {url}") is None
    handler.handle(_record("lmcache_core.storage_backend.remote_backend", "%s: %s refused: %s", url, "exists", "EXISTS: down"))
    assert handler.held_cause(f"could not ask {url}") == "exists refused: EXISTS: down"


def test_a_held_warning_is_printed_after_a_few_seconds_on_a_command_that_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long command (warm against a flapping remote) shows why it stalls while it runs."""
    monkeypatch.setattr(log_lines, "HOLD_S", 0.2)
    stream = io.StringIO()
    handler = HoldingHandler(stream, debug=False)
    handler.handle(_record("lmcache_core.storage_backend.remote_backend", "%s: %s refused: %s", "s3://b/p", "put", "slow down"))  # fmt: skip
    assert stream.getvalue() == ""
    deadline = time.monotonic() + 5
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stream.getvalue() == "warning: s3://b/p: put refused: slow down\n"
    handler.release_held(None, last=True)
    assert stream.getvalue().count("warning:") == 1  # not twice
    handler.handle(_record("lmcache_core.storage_backend.remote_backend", "%s: %s refused: %s", "s3://b/p", "get", "x"))
    assert stream.getvalue().endswith("warning: s3://b/p: get refused: x\n")  # the command ended: no holding


def test_warnings_held_when_ctrl_c_ends_the_process_are_printed_first(tmp_path: Path) -> None:
    """end_interrupted (the grace timer after Ctrl-C, bench's second Ctrl-C) ends the
    process with os._exit: the warnings still held explained the hang, and were lost."""
    code = (
        "import logging\n"
        "from lmcache_cli.log_lines import install_log_handler\n"
        "from lmcache_cli.errors import end_interrupted\n"
        "install_log_handler()\n"
        "logging.getLogger('lmcache_core.storage_backend.remote_backend').warning("
        "'%s: %s refused: %s', 'redis://h:1/0', 'exists', ConnectionError('down'))\n"
        "end_interrupted()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 130
    assert proc.stderr.splitlines() == ["warning: redis://h:1/0: exists refused: down", "error: interrupted"], proc.stderr
