"""Regressions for the read paths of `get --tokens` and `warm`, found by audit.

1. Reading a prompt's prefix (`get --tokens`) or a warm source went through the
   backends' `get`, which deletes a chunk that fails its checksum ("corrupt chunk
   ... removed") and reads with the atime bump that makes a chunk look used. Now
   both read the way `get KEY`/`show`/`verify` do: a bad chunk is reported with its
   reason and left in place (only `verify --fix` removes chunks), and no chunk's
   age changes (README: inspecting chunks does not count as using them).
2. `warm` skipped every destination chunk that merely existed, so a truncated,
   empty or mangled copy was never repaired. Now a copy is skipped only when its
   header and size check out (with `--verify-existing`, its checksum too).

Real CLI runs on real files; no mocks.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from lmcache_core.key import CacheEngineKey, chunk_hashes
from tests.test_cli import MODEL, Cli, _host, _kv, _prompt, chunk_path, put_many, set_times

# Every test: no LMCACHE_* variable of the caller, a private default store.
pytestmark = pytest.mark.usefixtures("private_cli_env")

TEN_DAYS = 10 * 86400.0
CHUNK = 8  # tokens per chunk: 40 tokens are 5 chunks


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "store")


def flip_payload_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))


def times(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """(atime, mtime) in ns of each file."""
    return {p: (p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in paths}


def age(paths: list[Path], seconds: float = TEN_DAYS) -> dict[Path, tuple[int, int]]:
    for p in paths:
        set_times(p, seconds)
    return times(paths)


def put_prompt(cli: Cli, tmp_path: Path, n: int = 40) -> tuple[Path, list[str]]:
    """A prompt of ``n`` tokens stored in chunks of ``CHUNK``; its file and chunk keys in order."""
    prompt, kv = _prompt(tmp_path, n), _kv(tmp_path, n)
    cli("put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", str(CHUNK))
    hashes = chunk_hashes(list(range(1000, 1000 + n)), CHUNK)
    return prompt, [CacheEngineKey("vllm", MODEL, 1, 0, h).to_string() for h in hashes]


def get_tokens(cli: Cli, prompt: Path, out: Path, *extra: str, code: int = 0) -> Any:
    return cli("get", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", str(CHUNK), "-o", str(out), *extra, code=code)


# -- 1. get --tokens ---------------------------------------------------------------------


def test_get_tokens_reports_a_corrupt_chunk_and_leaves_it_and_every_age_alone(cli: Cli, tmp_path: Path) -> None:
    prompt, keys = put_prompt(cli, tmp_path)
    files = [chunk_path(cli.store, k) for k in keys]
    bad = files[2]
    flip_payload_byte(bad)
    bad_bytes = bad.read_bytes()
    before = age(files)
    out = tmp_path / "prefix.safetensors"

    data = cli.json("get", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", str(CHUNK), "-o", str(out))
    # The evidence is still there, byte for byte, for verify to report and --fix to
    # remove, and no chunk looks used (times first: reading the file bumps its atime).
    assert bad.exists() and times(files) == before
    assert bad.read_bytes() == bad_bytes
    before = age(files)  # (that read was this test's own)
    assert (data["tokens"], data["chunks"], data["total_tokens"]) == (16, 2, 40)
    assert data["failed"] == 1
    (failure,) = data["failures"]
    assert failure["key"] == keys[2] and failure["status"] == "corrupt" and "checksum mismatch" in failure["reason"]
    assert load_file(str(out))["kv"].shape[2] == 16

    human = get_tokens(cli, prompt, out)
    assert "16 of 40 tokens" in human.stderr
    assert "warning:" in human.stderr and keys[2] in human.stderr and "checksum mismatch" in human.stderr
    assert "removed" not in human.stderr

    assert times(files) == before
    report = cli.json("verify", code=1)
    assert [b["chunk"] for b in report["bad"]] == [keys[2]]


def test_get_tokens_with_a_corrupt_first_chunk_fails_with_the_reason_and_keeps_it(cli: Cli, tmp_path: Path) -> None:
    prompt, keys = put_prompt(cli, tmp_path)
    files = [chunk_path(cli.store, k) for k in keys]
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    before = age(files)
    out = tmp_path / "prefix.safetensors"
    err = get_tokens(cli, prompt, out, code=1).stderr
    assert files[0].exists() and files[0].stat().st_size == 100
    assert times(files) == before
    assert err.startswith("error:") and "nothing written" in err and keys[0] in err and "truncated" in err
    assert not out.exists()


def test_get_tokens_does_not_count_as_use(cli: Cli, tmp_path: Path) -> None:
    prompt, keys = put_prompt(cli, tmp_path)
    files = [chunk_path(cli.store, k) for k in keys]
    before = age(files)
    assert cli.json("get", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", str(CHUNK), "-o", str(tmp_path / "o.safetensors"))["tokens"] == 40
    assert times(files) == before
    # ...so eviction by age still sees them as unused for ten days.
    plan = cli.json("evict", "--older-than", "7d", "--dry-run")
    assert plan["plan"]["chunks"] == len(keys)
    assert all(e["age_s"] > TEN_DAYS - 60 for e in cli.json("ls")["chunks"])


# -- 1. warm's source ----------------------------------------------------------------------


def test_warm_leaves_a_corrupt_source_chunk_in_place_and_source_ages_alone(cli: Cli, tmp_path: Path) -> None:
    keys = put_many(cli, tmp_path, 4)
    files = [chunk_path(cli.store, k) for k in keys]
    flip_payload_byte(files[1])
    bad_bytes = files[1].read_bytes()
    before = age(files)
    dst = tmp_path / "dst"

    res = cli.json("warm", "--from", str(cli.store), "--to", str(dst), code=1)
    assert files[1].exists() and times(files) == before  # reading a source is not using it
    assert files[1].read_bytes() == bad_bytes
    assert (res["copied"], res["failed"]) == (3, 1)
    (failure,) = res["failures"]
    assert failure["key"] == keys[1] and "checksum mismatch" in failure["reason"]
    human = cli("warm", "--from", str(cli.store), "--to", str(tmp_path / "dst2"), code=1)
    assert "checksum mismatch" in human.stdout and "removed" not in human.stderr

    assert files[1].read_bytes() == bad_bytes
    assert not chunk_path(dst, keys[1]).exists()
    assert [b["chunk"] for b in cli.json("verify", code=1)["bad"]] == [keys[1]]


def test_warm_only_reads_the_source_store(cli: Cli, tmp_path: Path) -> None:
    """Opening the source as a disk backend rebuilt its index and deleted its stale
    temp files; warm reads a disk source's files and changes nothing there."""
    keys = put_many(cli, tmp_path, 2)
    stray = chunk_path(cli.store, keys[0]).parent / f".x.safetensors.{_host()}.999999999.0.tmp"
    stray.write_bytes(b"partial")
    set_times(stray, 7200)
    res = cli.json("warm", "--from", str(cli.store), "--to", str(tmp_path / "dst"))
    assert res["copied"] == 2
    assert stray.exists()


# -- 2. warm's destination ------------------------------------------------------------------


def test_warm_rewrites_truncated_empty_and_bad_header_destination_copies(cli: Cli, tmp_path: Path) -> None:
    keys = put_many(cli, tmp_path, 5)
    dst = tmp_path / "dst"
    assert cli.json("warm", "--from", str(cli.store), "--to", str(dst))["copied"] == 5
    copies = [chunk_path(dst, k) for k in keys]
    copies[0].write_bytes(b"")  # empty
    copies[1].write_bytes(copies[1].read_bytes()[:300])  # truncated
    raw = bytearray(copies[2].read_bytes())
    raw[12] ^= 0xFF  # inside the JSON header
    copies[2].write_bytes(bytes(raw))
    flip_payload_byte(copies[3])  # only a checksum read finds this one
    good = age([copies[4]])

    dry = cli.json("warm", "--from", str(cli.store), "--to", str(dst), "--dry-run")
    assert (dry["to_copy"], dry["to_skip"]) == (3, 2) and dry["to_repair"] == 3
    assert set(dry["keys"]) == set(keys[:3])

    res = cli.json("warm", "--from", str(cli.store), "--to", str(dst))
    assert (res["copied"], res["skipped"], res["failed"]) == (3, 2, 0) and res["repaired"] == 3
    for k in keys[:3]:
        assert chunk_path(dst, k).read_bytes() == chunk_path(cli.store, k).read_bytes()
    assert times([copies[4]]) == good  # a good copy that was skipped keeps its age
    # The default check is header + size: the payload flip is still there...
    assert [b["chunk"] for b in Cli(dst).json("verify", code=1)["bad"]] == [keys[3]]
    assert "copied 0, skipped 5, failed 0" in cli("warm", "--from", str(cli.store), "--to", str(dst)).stdout
    # ...until warm is asked to read existing copies in full.
    human = cli("warm", "--from", str(cli.store), "--to", str(dst), "--verify-existing").stdout
    assert "copied 1 (1 repaired), skipped 4, failed 0" in human
    assert Cli(dst).json("verify")["problems_left"] == 0
    assert cli.json("warm", "--from", str(cli.store), "--to", str(dst), "--verify-existing")["skipped"] == 5


def test_warm_rewrites_a_truncated_object_in_a_remote_destination(cli: Cli, tmp_path: Path) -> None:
    from lmcache_core.storage_backend import open_backend
    from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend

    keys = put_many(cli, tmp_path, 3)
    dst = f"memory://warm-{uuid.uuid4().hex}"
    assert cli.json("warm", "--from", str(cli.store), "--to", dst)["copied"] == 3
    with open_backend(dst, dst_device="cpu") as remote:
        assert isinstance(remote, LMCRemoteBackend)
        for k, cut in ((keys[0], 40), (keys[1], -1)):  # inside the header; one payload byte short
            good = chunk_path(cli.store, k).read_bytes()
            remote.connector.put(CacheEngineKey.from_string(k), [good[:cut]])
    res = cli.json("warm", "--from", str(cli.store), "--to", dst)
    assert (res["copied"], res["skipped"]) == (2, 1) and res["repaired"] == 2
    with open_backend(dst, dst_device="cpu") as remote:
        for k in keys:
            assert remote.get(CacheEngineKey.from_string(k)) is not None



# -- 3. a tiered store: a bad local copy falls through to a good remote one -----------------


def tiered_store(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A config with a disk tier and a (local fsspec) remote tier; (config, disk, remote)."""
    disk, remote = tmp_path / "disk", tmp_path / "remote"
    disk.mkdir()
    remote.mkdir()
    cfg = tmp_path / "tiered.yaml"
    cfg.write_text(f"local_disk: {disk}\nremote_url: 'fsspec+file://{remote}'\nremote_timeout: 5\n")
    return cfg, disk, remote


def test_get_tokens_and_warm_read_a_good_remote_copy_past_a_corrupt_disk_copy(tmp_path: Path) -> None:
    cfg, disk, remote = tiered_store(tmp_path)
    tiered = Cli(tmp_path / "unused")
    conf = ("--config", str(cfg))
    n = 40
    prompt, kv = _prompt(tmp_path, n), _kv(tmp_path, n)
    tiered(*conf, "put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", str(CHUNK), store=False)
    keys = [CacheEngineKey("vllm", MODEL, 1, 0, h).to_string() for h in chunk_hashes(list(range(1000, 1000 + n)), CHUNK)]
    files = [chunk_path(disk, k) for k in keys]
    assert all(f.exists() for f in files)
    remote_files = sorted(p for p in remote.rglob("*") if p.is_file())
    assert len(remote_files) == len(keys)  # the remote tier holds every chunk too
    bad = files[1]
    flip_payload_byte(bad)
    bad_bytes = bad.read_bytes()
    before = age(files)

    out = tmp_path / "prefix.safetensors"
    data = tiered.json(*conf, "get", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", str(CHUNK), "-o", str(out), store=False)
    assert (data["tokens"], data["chunks"], data["failed"]) == (40, 5, 0)
    got = load_file(str(out))["kv"]
    assert got.shape[2] == 40 and got.equal(load_file(str(kv))["kv"])
    # No age changed (times first: reading the file bumps its atime), nothing was
    # filled, and the bad copy stays for verify to report.
    assert times(files) == before and bad.read_bytes() == bad_bytes
    before = age(files)  # (that read was this test's own)
    one = tmp_path / "one.safetensors"  # get KEY, too, writes the good copy
    tiered(*conf, "get", keys[1], "-o", str(one), store=False)
    (chunk1,) = load_file(str(one)).values()
    assert chunk1.equal(load_file(str(kv))["kv"][:, :, CHUNK : 2 * CHUNK])
    assert times(files) == before and bad.read_bytes() == bad_bytes
    before = age(files)

    dst = tmp_path / "dst"
    res = tiered.json(*conf, "warm", "--to", str(dst), store=False)
    assert (res["copied"], res["failed"]) == (5, 0)
    assert times(files) == before and bad.read_bytes() == bad_bytes
    assert chunk_path(dst, keys[1]).read_bytes() != bad_bytes
    assert Cli(dst).json("verify")["problems_left"] == 0
    assert sorted(p for p in remote.rglob("*") if p.is_file()) == remote_files


def test_a_tiered_store_reports_a_chunk_corrupt_in_every_tier_and_keeps_it(tmp_path: Path) -> None:
    cfg, disk, remote = tiered_store(tmp_path)
    tiered = Cli(tmp_path / "unused")
    conf = ("--config", str(cfg))
    prompt, kv = _prompt(tmp_path, 40), _kv(tmp_path, 40)
    tiered(*conf, "put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", str(CHUNK), store=False)
    keys = [CacheEngineKey("vllm", MODEL, 1, 0, h).to_string() for h in chunk_hashes(list(range(1000, 1000 + 40)), CHUNK)]
    disk_copy = chunk_path(disk, keys[2])
    (remote_copy,) = [p for p in remote.rglob("*") if p.is_file() and p.read_bytes() == disk_copy.read_bytes()]
    flip_payload_byte(disk_copy)
    flip_payload_byte(remote_copy)
    kept = disk_copy.read_bytes(), remote_copy.read_bytes()

    data = tiered.json(*conf, "get", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", str(CHUNK), "-o", str(tmp_path / "o.safetensors"), store=False)
    assert (data["tokens"], data["failed"]) == (16, 1)
    (failure,) = data["failures"]
    assert failure["key"] == keys[2] and failure["status"] == "corrupt" and "checksum mismatch" in failure["reason"]
    res = tiered.json(*conf, "warm", "--to", str(tmp_path / "dst"), code=1, store=False)
    assert (res["copied"], res["failed"]) == (4, 1) and "source chunk is bad" in res["failures"][0]["reason"]
    assert (disk_copy.read_bytes(), remote_copy.read_bytes()) == kept


# -- 4. reads side by side do not share the checksum helper -----------------------------------


def test_parallel_reads_read_alone_and_a_single_reader_shares_the_helper(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several readers each splitting a large read with the one shared checksum helper
    measured slower than each reading alone: ``read_prefix`` and ``warm`` with more
    than one job read with ``chunk_format.ALONE``; one job keeps the helper."""
    from lmcache_core import chunk_format, store_ops

    prompt, keys = put_prompt(cli, tmp_path)
    helpers: list[Any] = []
    real = chunk_format.read_payload_verified

    def spy(*args: Any, helper: Any = None, **kw: Any) -> None:
        helpers.append(helper)
        real(*args, helper=helper, **kw)

    monkeypatch.setattr(chunk_format, "read_payload_verified", spy)
    tokens = list(range(1000, 1040))
    with store_ops.Store(str(cli.store)) as store:
        for jobs, expected in ((4, chunk_format.ALONE), (1, None)):
            helpers.clear()
            got = store_ops.read_prefix(store, tokens, model=MODEL, chunk_size=CHUNK, jobs=jobs)
            assert got.tokens == 40 and helpers == [expected] * len(keys)
        ckeys = [CacheEngineKey.from_string(k) for k in keys]
        for jobs, expected in ((4, chunk_format.ALONE), (1, None)):
            helpers.clear()
            with store_ops.Store(str(tmp_path / f"dst{jobs}")) as dst:
                res = store_ops.warm(store, dst, ckeys, jobs=jobs)
            # (the destination's read-back is the backend's own read, not the source's)
            assert res.copied == len(keys) and helpers.count(chunk_format.ALONE) == (len(keys) if expected else 0)


def test_a_fetched_chunk_is_copied_only_when_its_buffer_is_read_only() -> None:
    from lmcache_core.store_ops import _writable

    pool = bytearray(b"chunk bytes")
    assert _writable(pool) is pool
    view = memoryview(pool)[2:]
    assert _writable(view) is view
    for frozen in (b"chunk bytes", memoryview(b"chunk bytes")):
        copy = _writable(frozen)
        assert isinstance(copy, bytearray) and copy == b"chunk bytes"


def test_an_interrupted_warm_drops_the_chunks_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (here: a progress callback that raises KeyboardInterrupt after the first
    chunk) stops warm at once: the queued copies are dropped, not all run first."""
    import threading

    import torch

    from lmcache_core import store_ops
    from lmcache_core.storage_backend import open_backend

    keys = [CacheEngineKey("vllm", MODEL, 1, 0, f"{i:064x}") for i in range(40)]
    with open_backend(str(tmp_path / "src"), dst_device="cpu") as backend:
        for k in keys:
            backend.put(k, torch.zeros(2, 2, 16, 2, 8), blocking=True)
    real, release = store_ops.copy_chunk, threading.Event()
    started: list[CacheEngineKey] = []

    def copy_chunk(src: Any, dst: Any, key: CacheEngineKey, **kw: Any) -> Any:
        started.append(key)
        if len(started) > 1:
            release.wait(2)  # a copy still in flight when the interrupt comes
        return real(src, dst, key, **kw)

    def interrupt(outcome: str, nbytes: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_ops, "copy_chunk", copy_chunk)
    src, dst = store_ops.Store(str(tmp_path / "src")), store_ops.Store(str(tmp_path / "dst"))
    try:
        with pytest.raises(KeyboardInterrupt):
            store_ops.warm(src, dst, keys, jobs=2, progress=interrupt)
        assert len(started) <= 3  # the first, and at most one per worker in flight; not all 40
    finally:
        release.set()
        src.close()
        dst.close()


# -- 4. a server's memory tier is not the tool's ----------------------------------------------


def test_a_tool_opens_a_configs_disk_and_remote_tiers_but_not_its_memory_tier(tmp_path: Path) -> None:
    """A tool's memory tier started empty ("memory: 0 tokens" in every lookup, whatever the
    servers held in theirs) and `warm --to` filled it up to max_local_cache_size, RAM of
    the tool's spent for nothing. The tool now sees the tiers other processes share."""
    from lmcache_core.config import LMCacheEngineConfig
    from lmcache_core.store_ops import Store

    cfg, disk, remote = tiered_store(tmp_path)
    cfg.write_text("local_device: cpu\nmax_local_cache_size: 1\n" + cfg.read_text())
    with Store(config=LMCacheEngineConfig.from_file(cfg)) as store:
        assert [name for name, _ in store.tiers() or []] == ["disk", "remote"]
        assert "memory" not in store.describe()
    tiered = Cli(tmp_path / "unused")
    conf = ("--config", str(cfg))
    n = 40
    prompt, kv = _prompt(tmp_path, n), _kv(tmp_path, n)
    tiered(*conf, "put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", str(CHUNK), store=False)
    look = tiered.json(*conf, "lookup", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", str(CHUNK), store=False)
    assert look["per_tier"] == [
        {"tier": "disk", "tokens": 40, "chunks": 5},
        {"tier": "remote", "tokens": 40, "chunks": 5},
    ]
    # A memory-only config is still the process-local store it says it is.
    with Store(config=LMCacheEngineConfig(local_device="cpu")) as store:
        assert store.kind == "memory" and store.describe() == "memory (cpu)"
