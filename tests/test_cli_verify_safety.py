"""Regressions for the CLI review: what `verify --fix` may delete, how remote
corruption is told from a timeout, that inspection does not count as use, and
store options that must not fall back or create things. Real files, a real
redis-server; no mocks."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lmcache_cli.main import app
from lmcache_core import layout
from lmcache_core.key import CacheEngineKey
from tests.conftest import make_key

runner = CliRunner()


# Every test: no LMCACHE_* variable of the caller, a private default store.
pytestmark = pytest.mark.usefixtures("private_cli_env")


def lmcache(*args: str, code: int | None = 0) -> Any:
    result = runner.invoke(app, list(args))
    if code is not None:
        assert result.exit_code == code, (
            f"lmcache {' '.join(args)} -> {result.exit_code}\nstdout: {result.stdout}\n"
            f"stderr: {result.stderr}\nexception: {result.exception!r}"
        )
    return result


def lmcache_json(*args: str, code: int = 0) -> Any:
    return json.loads(lmcache(*args, "--format", "json", code=code).stdout)


def chunk_tensor(seed: int = 0, shape: tuple[int, ...] = (2, 2, 16, 4, 8)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def put_chunks(url: str, n: int, shape: tuple[int, ...] = (2, 2, 16, 4, 8), **options: Any) -> list[CacheEngineKey]:
    """Store ``n`` chunks through the real backend (no CLI process, no tensor files)."""
    from lmcache_core.storage_backend import open_backend

    keys = [make_key(f"safety-{i}") for i in range(n)]
    with open_backend(url, dst_device="cpu", **options) as backend:
        for i, k in enumerate(keys):
            backend.put(k, chunk_tensor(i, shape), blocking=True)
    return keys


def flip_last_byte(raw: bytes) -> bytes:
    out = bytearray(raw)
    out[-1] ^= 0xFF
    return bytes(out)


# -- H1: verify --fix never deletes files outside the store's layout ----------------------


def test_verify_fix_never_removes_foreign_safetensors(tmp_path: Path) -> None:
    """Model weights under the store root are foreign: reported, not bad, never removed."""
    store = tmp_path / "hf"
    weights = store / "Llama-3.1-8B" / "model-00001-of-00004.safetensors"
    adapter = store / "adapter.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(weights))
    save_file({"w": torch.zeros(4)}, str(adapter))
    link = store / "snapshots" / "abc" / "model.safetensors"  # a huggingface-cache style symlink
    link.parent.mkdir(parents=True)
    link.symlink_to(weights)
    fifo = store / "pipe.safetensors"
    os.mkfifo(fifo)
    good, bad = put_chunks(str(store), 2)
    bad_path = Path(layout.disk_path(str(store), bad))
    bad_path.write_bytes(flip_last_byte(bad_path.read_bytes()))

    fixed = lmcache_json("--store", str(store), "verify", "--fix")
    assert weights.is_file() and adapter.is_file() and link.is_symlink() and fifo.is_fifo()
    assert fixed["removed"] == [bad.to_string()] and fixed["problems_left"] == 0
    assert [b["chunk"] for b in fixed["bad"]] == [bad.to_string()]
    assert {f["path"] for f in fixed["foreign"]} == {str(weights), str(adapter), str(link), str(fifo)}
    assert not bad_path.exists() and Path(layout.disk_path(str(store), good)).is_file()

    # Foreign files alone are no failure: exit 0, a warning, still there after --fix.
    human = lmcache("--store", str(store), "verify", "--fix")
    assert "not at a chunk path" in human.stderr and "warning:" in human.stderr
    assert weights.is_file() and adapter.is_file()


# -- H2 / M4: remote corruption vs. a remote that does not answer ----------------------------


def _redis_url(server: Any) -> str:
    return f"{server.url}?prefix=safety-{uuid.uuid4().hex[:8]}:"


def test_verify_fix_keeps_remote_chunks_that_time_out(redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that times out is unverified (exit 1), never bad, never removed."""
    url = _redis_url(redis_server)
    keys = put_chunks(url, 2, shape=(2, 2, 512, 32, 512))  # 64 MiB each
    # No 64 MiB GET answers in 10 ms (that is 6.7 GB/s over loopback); connecting and
    # listing must fit in it (3 ms did not, once, in a full run on a loaded machine).
    monkeypatch.setenv("LMCACHE_REMOTE_TIMEOUT", "0.01")
    report = lmcache_json("--store", url, "verify", "--fix", "-j", "1", code=1)
    assert report["bad"] == [] and report["removed"] == []
    assert {u["chunk"] for u in report["unverified"]} == {k.to_string() for k in keys}
    assert report["problems_left"] == 2
    monkeypatch.delenv("LMCACHE_REMOTE_TIMEOUT")
    assert lmcache_json("--store", url, "verify")["ok"] == 2  # all still there, all sound


def test_corrupt_remote_chunk_is_reported_as_corrupt(redis_server: Any, tmp_path: Path) -> None:
    """show/get/verify see a remote chunk that fails its checksum as corrupt, not absent."""
    url = _redis_url(redis_server)
    good, bad = put_chunks(url, 2)
    client = redis_server.client()
    name = url.split("prefix=")[1] + bad.to_string()
    client.set(name, flip_last_byte(client.get(name)))

    shown = lmcache_json("--store", url, "show", bad.to_string(), code=1)
    assert shown["checksum_ok"] is False and shown["checksum_status"].startswith("FAILED")
    assert "mismatch" in lmcache("--store", url, "show", bad.to_string(), code=1).stderr
    out = tmp_path / "bad.safetensors"
    got = lmcache("--store", url, "get", bad.to_string(), "-o", str(out), code=1)
    assert "mismatch" in got.stderr and "not in" not in got.stderr and not out.exists()

    report = lmcache_json("--store", url, "verify", "--fix")
    assert [b["chunk"] for b in report["bad"]] == [bad.to_string()] and report["removed"] == [bad.to_string()]
    assert client.exists(name) == 0 and lmcache_json("--store", url, "verify")["ok"] == 1


def test_an_empty_remote_value_at_a_chunk_name_is_listed_bad_and_removed_by_fix(redis_server: Any) -> None:
    """An empty string where a chunk should be (a write cut short) is not invisible:
    ls lists it, verify reports it, --fix removes it, and warm writes the chunk again."""
    url = _redis_url(redis_server)
    (good,) = put_chunks(url, 1)
    empty = make_key("emptied")
    client = redis_server.client()
    name = url.split("prefix=")[1] + empty.to_string()
    client.set(name, b"")
    listed = {c["key"]: c for c in lmcache_json("--store", url, "ls")["chunks"]}
    assert set(listed) == {good.to_string(), empty.to_string()} and listed[empty.to_string()]["size"] == 0
    report = lmcache_json("--store", url, "verify", code=1)
    assert [b["chunk"] for b in report["bad"]] == [empty.to_string()] and report["ok"] == 1
    fixed = lmcache_json("--store", url, "verify", "--fix")
    assert fixed["removed"] == [empty.to_string()] and client.exists(name) == 0
    assert lmcache_json("--store", url, "verify")["ok"] == 1


def test_show_on_a_stopped_remote_is_unavailable_not_missing(redis_server_private: Any) -> None:
    url = _redis_url(redis_server_private)
    (k,) = put_chunks(url, 1)
    redis_server_private.stop()
    r = lmcache("--store", url, "show", k.to_string(), code=1)
    assert "unavailable" in r.stderr and "not in" not in r.stderr and r.stderr.count("\n") == 1


# -- H3: looking at a chunk is not using it --------------------------------------------------


def test_inspection_keeps_chunk_ages(tmp_path: Path) -> None:
    store = tmp_path / "s"
    keys = put_chunks(str(store), 3)
    paths = [layout.disk_path(str(store), k) for k in keys]
    old = time.time() - 10 * 86400
    for p in paths:
        os.utime(p, (old, old))  # atime == mtime: relatime would update it on the next read
    s = str(store)
    lmcache("--store", s, "ls", "-l")
    lmcache("--store", s, "show", keys[0].to_string())
    lmcache("--store", s, "get", keys[1].to_string(), "-o", str(tmp_path / "out.safetensors"))
    lmcache("--store", s, "verify")
    assert [os.stat(p).st_atime for p in paths] == [pytest.approx(old)] * 3
    assert len(lmcache("--store", s, "ls", "--older-than", "7d", "-q").stdout.split()) == 3


# -- M2 / M3: store options that must not fall back or create ------------------------------


def test_empty_store_or_config_is_a_usage_error(tmp_path: Path) -> None:
    default = tmp_path / "xdg" / "lmcache"
    (k,) = put_chunks(str(default), 1)
    for opt in ("--store", "--config"):
        r = lmcache(opt, "", "evict", "*", "--yes", code=2)
        assert "empty" in r.stderr and r.stderr.count("\n") == 1
    assert Path(layout.disk_path(str(default), k)).is_file()  # the default store was not touched


def test_store_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"not a store")
    src = tmp_path / "t.safetensors"
    save_file({"x": chunk_tensor()}, str(src))
    for args in (["ls"], ["verify"], ["stats"], ["put", make_key(1).to_string(), str(src)]):
        r = lmcache("--store", str(plain), *args, code=1)
        assert "not a directory" in r.stderr and r.stderr.count("\n") == 1, args
    assert plain.read_bytes() == b"not a store"


def test_warm_from_a_missing_directory_fails_and_creates_nothing(tmp_path: Path) -> None:
    absent, dst = tmp_path / "absent", tmp_path / "dst"
    r = lmcache("warm", "--from", str(absent), "--to", str(dst), code=1)
    assert "no such store directory" in r.stderr and r.stderr.count("\n") == 1
    assert not absent.exists()


# -- M1: a tiered store is verified tier by tier, without filling --------------------------------


def test_verify_tiered_store_checks_each_tier_without_filling(tmp_path: Path, redis_server: Any) -> None:
    url = _redis_url(redis_server)
    disk = tmp_path / "tier-disk"
    cfg = tmp_path / "tiered.yaml"
    cfg.write_text(f"local_disk: {disk}\nremote_url: '{url}'\nmax_local_disk_size: 0.1\n")
    a, b = put_chunks(url, 2)  # in the remote only
    put_chunks(str(disk), 1)  # key a (same seed) in the disk tier too, sound
    client = redis_server.client()
    name_a = url.split("prefix=")[1] + a.to_string()
    client.set(name_a, flip_last_byte(client.get(name_a)))  # remote copy of a corrupt, disk copy good

    report = lmcache_json("--config", str(cfg), "verify", code=1)
    assert report["checked"] == 3 and report["ok"] == 2
    assert [x["chunk"] for x in report["bad"]] == [f"remote: {a.to_string()}"]
    assert not Path(layout.disk_path(str(disk), b)).exists()  # no read-through fill

    fixed = lmcache_json("--config", str(cfg), "verify", "--fix")
    assert fixed["removed"] == [f"remote: {a.to_string()}"] and fixed["problems_left"] == 0
    assert client.exists(name_a) == 0 and Path(layout.disk_path(str(disk), a)).is_file()


# -- L1, L2, L3, L5: one-line errors and honest warnings ------------------------------------


def test_root_usage_errors_and_bad_yaml_are_one_line(tmp_path: Path) -> None:
    r = lmcache("--format", "xml", "ls", code=2)
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and "--format" in r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("chunk_size: 1\nremote_url: redis://h:1/0?prefix=a:\n")  # ': ' inside a plain scalar
    r = lmcache("--config", str(cfg), "ls", code=1)
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and "YAML" in r.stderr


def test_token_id_beyond_int64_is_a_file_error(tmp_path: Path) -> None:
    tokens = tmp_path / "prompt.json"
    tokens.write_text(json.dumps([1, 2**70]))
    r = lmcache("--store", str(tmp_path / "s"), "lookup", "--tokens", str(tokens), "--model", "m", code=1)
    assert "64 bits" in r.stderr and "unexpected" not in r.stderr


def test_get_error_names_the_output_path_not_a_temp_file(tmp_path: Path) -> None:
    store = tmp_path / "s"
    (k,) = put_chunks(str(store), 1)
    out = tmp_path / "no-such-dir" / "out.safetensors"
    r = lmcache("--store", str(store), "get", k.to_string(), "-o", str(out), code=1)
    assert str(out) in r.stderr and ".tmp" not in r.stderr


def test_older_than_on_redis_warns_that_ages_are_unknown(redis_server: Any) -> None:
    url = _redis_url(redis_server)
    put_chunks(url, 1)
    r = lmcache("--store", url, "ls", "--older-than", "1d")
    assert "no recorded age" in r.stderr and "--older-than" in r.stderr
    r = lmcache("--store", url, "evict", "--older-than", "1d", "--dry-run")
    assert "no recorded age" in r.stderr
    # --to-size takes them first, in key order: said, not passed off as LRU.
    r = lmcache("--store", url, "evict", "--to-size", "0", "--dry-run")
    assert "no recorded age" in r.stderr and "key order" in r.stderr


def test_put_tokens_into_a_tiered_store_whose_remote_is_down_fails(tmp_path: Path, redis_server_private: Any) -> None:
    """Found by review: it said "stored 3 of 3 chunks ... in disk + redis" and exited 0
    while every remote write had failed, and a rerun skipped them all."""
    from safetensors.torch import save_file

    cfg = tmp_path / "tiered.yaml"
    cfg.write_text(
        f"local_disk: {tmp_path / 'disk'}\nremote_url: '{redis_server_private.url}?prefix=pt:'\nremote_timeout: 0.5\n"
    )
    (tmp_path / "t.json").write_text(json.dumps(list(range(300))))
    save_file({"kv": chunk_tensor(0, (2, 2, 300, 4, 8))}, str(tmp_path / "kv.safetensors"))
    args = ["--config", str(cfg), "put", "--tokens", str(tmp_path / "t.json"),
            "--kv", str(tmp_path / "kv.safetensors"), "--model", "m"]  # fmt: skip
    redis_server_private.kill()
    down = lmcache(*args, code=1)
    assert "2 chunks not stored in remote redis://" in down.stderr  # the tier that lacks them, by name
    assert json.loads(lmcache(*args, "--format", "json", code=1).stdout)["not_stored_in"][0].startswith("remote redis://")
    redis_server_private.restart()
    back = json.loads(lmcache(*args, "--format", "json").stdout)
    assert (back["stored"], back["skipped"], back["failed"]) == (2, 0, 0)


def plant_unkeyed_chunk(root: Path, name: str, seed: int) -> tuple[CacheEngineKey, Path, torch.Tensor]:
    """A chunk file with an empty key at ``make_key(name)``'s path under ``root``, as the
    seed's ``save_disk(path, kv_chunk)`` wrote them; (key, path, tensor)."""
    from lmcache_core import chunk_format

    key = make_key(name)
    path = Path(layout.disk_path(str(root), key))
    path.parent.mkdir(parents=True)
    tensor = chunk_tensor(seed)
    header, payload = chunk_format.encode(tensor, "")
    path.write_bytes(header + bytes(payload))
    return key, path, tensor


def test_an_unkeyed_chunk_the_disk_tier_serves_is_sound_to_the_tools(tmp_path: Path) -> None:
    """A chunk file with an empty key at a key's path (the seed's save_disk(path, kv_chunk)
    wrote such files) is served by the disk tier's get: verify must call it ok, --fix
    must keep it, and get/show must read it."""
    from lmcache_core.storage_backend import open_backend

    store = tmp_path / "store"
    key, path, tensor = plant_unkeyed_chunk(store, "unkeyed", seed=3)
    with open_backend(str(store), dst_device="cpu") as backend:
        got = backend.get(key)
        assert got is not None and torch.equal(got, tensor)  # what the backend serves
    report = lmcache_json("--store", str(store), "verify", "--fix")
    assert report["ok"] == 1 and report["bad"] == [] and report["removed"] == [] and path.exists()
    out = tmp_path / "out.safetensors"
    lmcache("--store", str(store), "get", key.to_string(), "-o", str(out))
    assert lmcache_json("--store", str(store), "show", key.to_string())["checksum_ok"] is True


def test_show_on_a_tiered_store_takes_an_unkeyed_disk_tier_chunk_too(tmp_path: Path) -> None:
    """The same file seen through a --config store's disk tier: show agrees with verify."""
    disk = tmp_path / "disk"
    key, _, _ = plant_unkeyed_chunk(disk, "unkeyed-tier", seed=4)
    cfg = tmp_path / "tiered.yaml"
    cfg.write_text(f"local_device: cpu\nlocal_disk: {disk}\n")
    shown = lmcache_json("--config", str(cfg), "show", key.to_string())
    assert shown["checksum_ok"] is True
    assert lmcache_json("--config", str(cfg), "verify")["ok"] == 1
