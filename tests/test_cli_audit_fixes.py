"""Regressions from the CLI audit, each named after the defect it reproduces.

A. ``put KEY FILE`` on a tiered store reported success when the remote tier refused.
B. ``lookup`` read a dead or blackholed server as "0 cached".
C. A mistyped disk store path read as an empty (or verified) store.
D. ``LMCACHE_<FIELD>`` tier variables without a config file were shown as in effect
   by ``lmcache config`` but ignored when the store was opened.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lmcache_cli.main import app
from tests.tcp_proxy import TcpProxy
from tests.test_cli import MODEL, tensor_file

pytestmark = pytest.mark.usefixtures("private_cli_env")

DEAD_REDIS = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
KEY_A = f"vllm@{MODEL}@1@0@" + "ab" * 32


def lmcache(*args: str, code: int | None = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    if code is not None:
        assert result.exit_code == code, (
            f"lmcache {' '.join(args)} -> {result.exit_code}\nstdout: {result.stdout}\n"
            f"stderr: {result.stderr}\nexception: {result.exception!r}"
        )
    return result


def tiered_config(tmp_path: Path, remote_url: str, *, disk: Path | None = None, timeout: float = 1.0) -> Path:
    disk = disk or tmp_path / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiered.yaml"
    path.write_text(f"local_disk: {disk}\nremote_url: '{remote_url}'\nremote_timeout: {timeout}\n")
    return path


def prompt(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(list(range(n))))
    return path


def kv_file(tmp_path: Path, n: int = 40) -> Path:
    return tensor_file(tmp_path, "kv.safetensors", shape=(2, 2, n, 4, 8))


def redis_url(server: Any, prefix: str) -> str:
    return f"{server.url}?prefix={prefix}:"


# -- A: put KEY FILE on a tiered store whose remote refuses ----------------------------------


def test_put_key_to_tiered_store_with_dead_remote_fails_naming_the_tier(tmp_path: Path) -> None:
    cfg = tiered_config(tmp_path, DEAD_REDIS)
    chunk = tensor_file(tmp_path)
    r = lmcache("--config", str(cfg), "put", KEY_A, str(chunk), code=1)
    assert f"error: {KEY_A} not stored in remote redis://:***@127.0.0.1:1/0" in r.stderr
    stored = [line for line in r.stderr.splitlines() if line.startswith("stored ")]
    assert len(stored) == 1 and f"disk {tmp_path / 'disk'}" in stored[0] and "redis" not in stored[0]
    assert "hunter2" not in r.stdout + r.stderr

    data = json.loads(lmcache("--config", str(cfg), "put", KEY_A, str(chunk), "--format", "json", code=1).stdout)
    assert f"disk {tmp_path / 'disk'}" in data["stored_in"]
    assert data["not_stored_in"] == ["remote redis://:***@127.0.0.1:1/0"]


def test_put_key_to_tiered_store_with_live_remote_lists_every_tier(tmp_path: Path, redis_server: Any) -> None:
    url = redis_url(redis_server, "audit-a")
    cfg = tiered_config(tmp_path, url)
    data = json.loads(lmcache("--config", str(cfg), "put", KEY_A, str(tensor_file(tmp_path)), "--format", "json").stdout)
    assert data["not_stored_in"] == []
    assert any(t.startswith("remote redis://127.0.0.1") for t in data["stored_in"])
    assert json.loads(lmcache("--store", url, "ls", "--format", "json").stdout)["count"] == 1


# -- B: lookup must not read "could not ask" as "not cached" ----------------------------------


def test_lookup_on_dead_remote_store_is_store_unavailable(tmp_path: Path) -> None:
    r = lmcache("--store", DEAD_REDIS, "lookup", "--tokens", str(prompt(tmp_path)), "--model", "llama", code=1)
    assert r.stderr.startswith("error: store unavailable: redis://:***@127.0.0.1:1/0")
    assert r.stderr.count("\n") == 1 and "cached prefix" not in r.stdout


def test_lookup_on_tiered_store_with_dead_remote_tier_is_store_unavailable(tmp_path: Path) -> None:
    cfg = tiered_config(tmp_path, DEAD_REDIS)
    args = ["--config", str(cfg), "lookup", "--tokens", str(prompt(tmp_path)), "--model", "llama"]
    r = lmcache(*args, code=1)
    assert "error: store unavailable: redis://:***@127.0.0.1:1/0" in r.stderr and "cached prefix" not in r.stdout
    assert lmcache(*args, "--format", "json", code=1).stdout == ""


def test_lookup_on_blackholed_remote_is_store_unavailable(tmp_path: Path) -> None:
    with TcpProxy(None, mode="blackhole") as proxy:  # accepts, never answers
        cfg = tiered_config(tmp_path, f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5)
        r = lmcache("--config", str(cfg), "lookup", "--tokens", str(prompt(tmp_path)), "--model", "llama", code=1)
    assert "error: store unavailable" in r.stderr and "cached prefix" not in r.stdout


def test_get_tokens_on_a_dead_remote_is_store_unavailable_not_no_prefix(tmp_path: Path) -> None:
    out = tmp_path / "kv.safetensors"
    for args in (("--store", DEAD_REDIS), ("--config", str(tiered_config(tmp_path, DEAD_REDIS)))):
        r = lmcache(*args, "get", "--tokens", str(prompt(tmp_path)), "--model", "llama", "-o", str(out), code=1)
        assert "error: store unavailable: redis://:***@127.0.0.1:1/0" in r.stderr, r.stderr
        assert "no cached prefix" not in r.stderr and not out.exists()


def test_lookup_on_live_remote_still_counts_the_prefix(tmp_path: Path, redis_server: Any) -> None:
    url = redis_url(redis_server, "audit-b")
    tokens = prompt(tmp_path, 40)
    lmcache("--store", url, "put", "--tokens", str(tokens), "--kv", str(kv_file(tmp_path)), "--model", "llama",
            "--chunk-size", "16")
    data = json.loads(
        lmcache("--store", url, "lookup", "--tokens", str(tokens), "--model", "llama", "--chunk-size", "16",
                "--format", "json").stdout
    )
    assert data["tokens"] == 40 and data["chunks"] == 3
    other = tmp_path / "other.json"
    other.write_text(json.dumps([7] * 40))
    miss = lmcache("--store", url, "lookup", "--tokens", str(other), "--model", "llama", "--format", "json")
    assert json.loads(miss.stdout)["tokens"] == 0  # a real miss on a live server is still 0, exit 0


# -- C: a disk store directory that does not exist ---------------------------------------------


READ_ONLY_COMMANDS = {
    "ls": ["ls"],
    "stats": ["stats"],
    "verify": ["verify"],
    "evict": ["evict", "*", "--yes"],
    "show": ["show", KEY_A],
    "get": ["get", KEY_A, "-o", "{tmp}/out.safetensors"],
    "lookup": ["lookup", "--tokens", "{tmp}/prompt.json", "--model", "llama"],
}


@pytest.mark.parametrize("command", sorted(READ_ONLY_COMMANDS))
def test_read_only_command_on_missing_store_directory_fails(tmp_path: Path, command: str) -> None:
    prompt(tmp_path)
    missing = tmp_path / "no" / "such" / "store"
    args = [a.replace("{tmp}", str(tmp_path)) for a in READ_ONLY_COMMANDS[command]]
    r = lmcache("--store", str(missing), *args, code=1)
    assert r.stderr == f"error: no such store directory: {missing}; check --store\n"
    assert r.stdout == "" and not missing.exists() and not (tmp_path / "out.safetensors").exists()


def test_missing_store_directory_from_env_and_config_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "typo"
    cfg = tmp_path / "disk.yaml"
    cfg.write_text(f"local_device: file://{missing}\n")
    r = lmcache("--config", str(cfg), "stats", code=1)
    assert r.stderr.startswith(f"error: no such store directory: {missing}; check local_device (file {cfg})")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", str(missing))  # memory + disk: the disk is the store
    r = lmcache("lookup", "--tokens", str(prompt(tmp_path)), "--model", "llama", code=1)
    assert r.stderr == f"error: no such store directory: {missing}; check local_disk (env LMCACHE_LOCAL_DISK)\n"
    monkeypatch.setenv("LMCACHE_STORE", str(missing))
    r = lmcache("ls", code=1)
    assert r.stderr.endswith(f"error: no such store directory: {missing}; check env LMCACHE_STORE\n")
    assert not missing.exists()


def test_missing_disk_tier_in_front_of_a_remote_is_no_error(tmp_path: Path, redis_server: Any) -> None:
    """A fresh node lacks its local cache directory; the remote behind it is still the store."""
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"local_disk: {tmp_path / 'fresh'}\nremote_url: '{redis_url(redis_server, 'audit-c')}'\n")
    assert json.loads(lmcache("--config", str(cfg), "ls", "--format", "json").stdout)["count"] == 0


def test_missing_default_store_is_empty_and_put_creates_stores(tmp_path: Path) -> None:
    r = lmcache("ls")  # the default store of a fresh machine: empty, not an error
    assert r.stdout.startswith("0 chunks") and "xdg/lmcache" in r.stdout
    new = tmp_path / "new" / "store"
    lmcache("--store", str(new), "put", KEY_A, str(tensor_file(tmp_path)))
    assert json.loads(lmcache("--store", str(new), "ls", "--format", "json").stdout)["count"] == 1


# -- D: LMCACHE_<FIELD> tier variables without a config file -----------------------------------


def test_env_tier_variables_describe_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "data"
    lmcache("--store", str(disk), "put", KEY_A, str(tensor_file(tmp_path)))
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", str(disk))
    settings = json.loads(lmcache("config", "--format", "json").stdout)["settings"]
    assert settings[0]["value"] == f"disk {disk}"  # the memory tier (LMCache's default cpu) is a server's own
    assert settings[0]["source"] == "env LMCACHE_LOCAL_DISK"
    listing = json.loads(lmcache("ls", "--format", "json").stdout)
    assert listing["store"] == f"disk {disk}"
    assert [c["key"] for c in listing["chunks"]] == [KEY_A]


def test_a_memory_device_variable_alone_keeps_the_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LMCACHE_LOCAL_DEVICE=cpu (LMCache's default, often set) must not turn the CLI's
    store into an in-process cache that forgets every put when the command exits."""
    monkeypatch.setenv("LMCACHE_LOCAL_DEVICE", "cpu")
    stored = json.loads(lmcache("put", KEY_A, str(tensor_file(tmp_path)), "--format", "json").stdout)
    assert len(stored["stored_in"]) == 1 and stored["stored_in"][0].startswith("disk ")
    assert [c["key"] for c in json.loads(lmcache("ls", "--format", "json").stdout)["chunks"]] == [KEY_A]


def test_env_remote_url_is_the_store_remote_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: Any) -> None:
    url = redis_url(redis_server, "audit-d")
    monkeypatch.setenv("LMCACHE_REMOTE_URL", url)
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", str(tmp_path / "node"))
    lmcache("put", KEY_A, str(tensor_file(tmp_path)))
    monkeypatch.delenv("LMCACHE_REMOTE_URL")
    monkeypatch.delenv("LMCACHE_LOCAL_DISK")
    assert json.loads(lmcache("--store", url, "ls", "--format", "json").stdout)["count"] == 1
    default = json.loads(lmcache("ls", "--format", "json").stdout)
    assert default["count"] == 0 and default["store"].endswith("xdg/lmcache")  # nothing went to the default


def test_store_option_over_env_tier_variables_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("LMCACHE_REMOTE_URL", DEAD_REDIS)
    r = lmcache("--store", str(store), "ls")
    assert r.stderr == (
        "warning: LMCACHE_REMOTE_URL ignored: --store names the store "
        "(without --store, LMCACHE_<FIELD> tier variables describe it)\n"
    )
    rows = {s["name"]: s for s in json.loads(lmcache("--store", str(store), "config", "--format", "json").stdout)["settings"]}
    assert rows["remote_url"]["source"] == "env LMCACHE_REMOTE_URL (ignored: --store names the store)"


def test_a_contains_that_a_retry_made_good_is_an_answer() -> None:
    """One failed attempt, then the retry answers: the lookup stands (a remote's
    ``remote_errors`` counts that attempt; only ``unavailable`` means no answer)."""
    import torch

    from lmcache_cli.store_tiers import answered
    from lmcache_core import store_ops
    from lmcache_core.config import LMCacheEngineConfig
    from lmcache_core.key import CacheEngineKey, chunk_hashes
    from lmcache_core.storage_backend.connector.fsspec_connector import FsspecConnector
    from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend

    class Blip(FsspecConnector):
        fails = 0

        def exists(self, key: Any) -> bool:
            if Blip.fails > 0:
                Blip.fails -= 1
                raise ConnectionError("a transient blip")
            return bool(super().exists(key))

    url = f"memory://blip-{uuid.uuid4().hex[:8]}"
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=5)
    tokens = list(range(32))
    with LMCRemoteBackend(cfg, None, "cpu", connector=Blip(url, timeout=5)) as writer:
        for h in chunk_hashes(tokens, 16):
            writer.put(CacheEngineKey("vllm", "m", 1, 0, h), torch.zeros(2, 2, 16, 2, 4), blocking=True)
    store = store_ops.Store(url, cfg)
    store._backend = LMCRemoteBackend(cfg, None, "cpu", connector=Blip(url, timeout=5))  # nothing known yet
    try:
        Blip.fails = 1
        with answered(store, "whether chunks are cached"):
            found = store_ops.prefix_lookup(store, tokens, model="m", chunk_size=16)
        assert found["tokens"] == 32
        assert store.backend.stats["retries"] == 1  # the blip happened, and was retried
    finally:
        store.close()


@pytest.mark.parametrize(
    "args, says",
    [
        (("--dtype", "foo"), "dtype 'foo': one of bfloat16"),
        (("--dtype", "int4"), "dtype 'int4': one of bfloat16"),
        (("--kv-shape", "2,0,4"), "expected L,2,T,H,D"),
    ],
)
def test_bench_parameter_mistakes_are_usage_errors_before_any_work(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    store = tmp_path / "s"
    r = lmcache("bench", "-s", str(store), *args, code=2)
    assert r.stderr.startswith("error: ") and says in r.stderr and r.stderr.count("\n") == 1
    assert not store.exists()  # nothing generated, nothing written


def test_warm_to_a_dead_remote_names_the_cause_in_every_failure(tmp_path: Path) -> None:
    """Once the circuit opens, later chunks fail fast: their reason still names what
    failed ("Connection refused"), not only "circuit open"."""
    src = tmp_path / "src"
    for i in range(8):
        key = f"vllm@{MODEL}@1@0@{i:064x}"
        lmcache("--store", str(src), "put", key, str(tensor_file(tmp_path)))
    r = lmcache("warm", "--from", str(src), "--to", DEAD_REDIS, "--format", "json", code=1)
    report = json.loads(r.stdout)
    reasons = [f["reason"] for f in report["failures"]]
    assert len(reasons) == 8 and report["copied"] == 0
    assert any("circuit open" in why for why in reasons)  # the later ones failed fast
    assert all("Connection refused" in why for why in reasons), reasons
    assert "hunter2" not in r.stdout + r.stderr


def test_ctrl_c_in_a_command_is_exit_130_whatever_typer_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Typer 0.12 turns KeyboardInterrupt into "Aborted!" and exit 1; the CLI's own
    handler makes it 130 (the code main() ends the process with at once)."""
    from lmcache_core import store_ops

    def interrupted(self: Any) -> Any:
        raise KeyboardInterrupt

    (tmp_path / "s").mkdir()
    monkeypatch.setattr(store_ops.Store, "entries", interrupted)
    lmcache("--store", str(tmp_path / "s"), "ls", code=130)


def test_bench_of_a_bad_store_url_keeps_the_other_stores_figures(tmp_path: Path) -> None:
    r = lmcache("bench", "--quick", "--chunk-mb", "0.0625", "--count", "2", "--batch", "2",
                "-s", "cpu://", "-s", "redis://[::1", "--format", "json", code=1)  # fmt: skip
    report = json.loads(r.stdout)
    assert {row["store"] for row in report["rows"]} == {"cpu://"} and len(report["errors"]) == 1
    assert report["errors"][0]["store"] == "redis://[::1" and "IPv6" in report["errors"][0]["error"]


# -- ls -l during an outage ----------------------------------------------------------------


def test_headers_read_during_an_outage_raise_instead_of_reading_as_bad_chunks(redis_server: Any) -> None:
    """`ls -l` listed every chunk as "(unreadable header)" (JSON `header_ok: false`) and
    exited 0 when the remote stopped answering after the listing: an outage read as damage."""
    import torch

    from lmcache_core.config import LMCacheEngineConfig
    from lmcache_core.errors import StoreUnavailableError
    from lmcache_core.key import CacheEngineKey
    from lmcache_core.store_ops import Store

    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0?prefix=lsl-{uuid.uuid4().hex[:8]}:"
        key = CacheEngineKey("vllm", MODEL, 1, 0, "ab" * 32)
        with Store(url, LMCacheEngineConfig(remote_timeout=0.5)) as store:
            store.backend.put(key, torch.ones(2, 2, 4, 2, 8))
            (entry,) = store.entries()
            header = store.header(entry.key)
            assert header is not None and header.shape == (2, 2, 4, 2, 8)
            proxy.set_mode("blackhole")
            with pytest.raises(StoreUnavailableError):
                store.header(entry.key)
            # The serving path's read_header stays a hint: None, never an exception.
            assert store.backend.read_header(key) is None
            proxy.set_mode("forward")
            store.backend.remove(key)
