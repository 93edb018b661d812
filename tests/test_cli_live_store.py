"""Regressions from running the CLI against a store a serving process is using.

1. ``evict`` removed by key whatever file was at a chunk's path when it ran: a chunk
   the server wrote again after the plan was shown (the prompt can wait minutes)
   was deleted. Now only the very file listed is removed; a changed one is left alone.
2. Read-only commands on a ``--config`` store (memory + disk tier with a
   ``max_local_disk_size``) deleted disk chunks: the disk tier's index rebuild
   evicted down to the YAML budget when ``ls``, ``stats``, ``evict --dry-run``,
   ``show`` or ``get`` opened it. Now a tool opens every store without a budget,
   and its writes (``put``, ``warm --to``) evict nothing either.
3. ``evict "" --yes`` (an unset ``$PATTERN``) removed every chunk. An empty or blank
   PATTERN is now a usage error for every command that takes one.
4. ``warm --from`` a live store failed (exit 1) for chunks the server evicted after
   warm listed them. They are now counted as ``gone``; with ``--keys`` a missing
   chunk is still a failure.
5. ``get -o`` onto a full file system said ``I/O error:: ...`` (no path);
   ``put --tokens --format json`` that failed part-way printed no JSON.

Real files and the real CLI; a "server" is a real disk backend acting at the moment
the race needs (a confirmation prompt, right after a listing).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import typer

from lmcache_cli.commands import evict as evict_cmd
from lmcache_core import store_ops
from lmcache_core.key import CacheEngineKey, chunk_hashes
from lmcache_core.storage_backend import open_backend
from lmcache_core.store_ops import Store, plan_evict, run_evict
from tests.test_cli import MODEL, Cli, chunk_path, key, put_many, tensor_file
from tests.test_cli_subprocess import clean_env, lmcache_exe

# Every test: no LMCACHE_* variable of the caller, a private default store.
pytestmark = pytest.mark.usefixtures("private_cli_env")


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    store = tmp_path / "store"
    store.mkdir()
    return Cli(store)


def server_rewrites(root: Path, k: str) -> None:
    """The serving process puts ``k`` again (a new file at its path, as its writes are)."""
    server = open_backend(str(root), max_local_disk_size=1)
    try:
        server.put(CacheEngineKey.from_string(k), torch.randn(2, 2, 16, 4, 8).to(torch.bfloat16))
    finally:
        server.close()


def server_removes(root: Path, keys: list[str]) -> None:
    """The serving process evicts ``keys`` (its own LRU budget)."""
    server = open_backend(str(root), max_local_disk_size=1)
    try:
        for k in keys:
            assert server.remove(CacheEngineKey.from_string(k))
    finally:
        server.close()


def chunk_files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*.safetensors")}


# -- 1. evict removes only the file its plan listed -----------------------------------------


def test_regression_evict_removed_a_chunk_rewritten_between_plan_and_removal(cli: Cli, tmp_path: Path) -> None:
    rewritten, other = put_many(cli, tmp_path, 2)
    with Store(str(cli.store)) as store:
        plan = plan_evict(store.entries(), pattern="*")
        assert {v.key.to_string() for v in plan.victims} == {rewritten, other}
        server_rewrites(cli.store, rewritten)  # while the operator reads the plan
        new_file = chunk_path(cli.store, rewritten).read_bytes()
        result = run_evict(store, plan)
    assert result.left_alone == [rewritten]
    assert result.removed == 1 and result.failures == []
    assert result.freed == next(v.size for v in plan.victims if v.key.to_string() == other)
    assert chunk_path(cli.store, rewritten).read_bytes() == new_file  # the server's copy stays
    assert not chunk_path(cli.store, other).exists()


def test_regression_evict_cli_reports_a_chunk_changed_while_the_prompt_waited(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rewritten, other = put_many(cli, tmp_path, 2)
    monkeypatch.setattr(evict_cmd, "stdin_is_terminal", lambda: True)
    answered: list[str] = []

    def operator_answers_yes_after_the_server_wrote(text: str, **kw: Any) -> bool:
        answered.append(text)
        server_rewrites(cli.store, rewritten)
        return True

    monkeypatch.setattr(typer, "confirm", operator_answers_yes_after_the_server_wrote)
    res = cli.json("evict", "*")
    assert answered, "evict never asked"
    assert res["removed"] == 1 and res["left_alone"] == [rewritten] and res["failures"] == []
    sizes = {v["key"]: v["size"] for v in res["plan"]["victims"]}
    assert res["bytes_freed"] == sizes[other]  # not the one left alone
    assert chunk_path(cli.store, rewritten).is_file() and not chunk_path(cli.store, other).exists()

    assert put_many(cli, tmp_path, 2) == [rewritten, other]  # again, human output
    r = cli("evict", "*")
    assert "removed 1 chunk" in r.stdout and "changed since the plan" in r.stdout
    assert "changed since the plan" in r.stderr and rewritten in r.stderr
    assert chunk_path(cli.store, rewritten).is_file()


def test_evict_still_removes_untouched_chunks_and_counts_vanished_ones_as_not_removed(
    cli: Cli, tmp_path: Path
) -> None:
    keys = put_many(cli, tmp_path, 3)
    with Store(str(cli.store)) as store:
        plan = plan_evict(store.entries(), pattern="*")
        server_removes(cli.store, [keys[0]])  # gone before the removal: not ours to count
        result = run_evict(store, plan)
    assert (result.removed, result.left_alone, result.failures) == (2, [], [])
    assert chunk_files(cli.store) == set()


# -- 2. a tool never evicts on open, a --config budget included ------------------------------


def budget_config(tmp_path: Path, disk: Path) -> Path:
    """The deployment's YAML: memory tier + disk tier whose budget holds about 2 test chunks."""
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(f"local_device: cpu\nlocal_disk: {disk}\nmax_local_disk_size: 0.00001\n")
    return cfg


def test_regression_read_only_commands_on_a_config_store_evicted_disk_chunks(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    keys = put_many(Cli(disk), tmp_path, 5)  # more than the YAML's budget (several servers share it)
    before = chunk_files(disk)
    assert len(before) == 5
    cfg = budget_config(tmp_path, disk)
    tool = Cli(tmp_path / "unused")

    def run(*args: str, code: int = 0) -> Any:
        return tool("--config", str(cfg), *args, code=code, store=False)

    commands = [
        ["evict", "--model", "nothing-matches", "--dry-run"],
        ["ls"],
        ["stats"],
        ["show", keys[0]],
        ["get", keys[1], "-o", str(tmp_path / "out.safetensors")],
        ["evict", "*", "--dry-run"],
        ["verify"],
    ]
    for args in commands:
        run(*args)
        assert chunk_files(disk) == before, f"`lmcache {' '.join(args)}` deleted chunks"
    assert json.loads(run("ls", "--format", "json").stdout)["count"] == 5


def test_writes_to_a_config_store_evict_nothing_that_was_there(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    put_many(Cli(disk), tmp_path, 5)
    before = chunk_files(disk)
    cfg = budget_config(tmp_path, disk)
    tool = Cli(tmp_path / "unused")
    new_key = key("new")
    tool("--config", str(cfg), "put", new_key, str(tensor_file(tmp_path, "n.safetensors", seed=9)), store=False)
    assert chunk_files(disk) == before | {chunk_path(disk, new_key).name}
    src = tmp_path / "src"
    src.mkdir()
    warmed = put_many(Cli(src), tmp_path, 2, model="other/model")
    res = json.loads(tool("--config", str(cfg), "warm", "--from", str(src), "--format", "json", store=False).stdout)
    assert res["copied"] == 2 and res["failed"] == 0
    assert chunk_files(disk) == before | {chunk_path(disk, k).name for k in [new_key, *warmed]}


# -- 3. an empty PATTERN is never "everything" ------------------------------------------------


@pytest.mark.parametrize("pattern", ["", "   ", "\t"])
def test_regression_evict_empty_pattern_removed_every_chunk(cli: Cli, tmp_path: Path, pattern: str) -> None:
    keys = put_many(cli, tmp_path, 3)
    for args in (["evict", pattern, "--yes"], ["evict", pattern, "--dry-run"], ["evict", pattern, "--model", MODEL, "--yes"]):
        r = cli(*args, code=2)
        assert r.stderr.startswith("error:") and "'*'" in r.stderr and r.stderr.count("\n") == 1
    assert cli.json("ls")["count"] == 3
    assert all(chunk_path(cli.store, k).is_file() for k in keys)


@pytest.mark.parametrize("pattern", ["", "  "])
def test_empty_pattern_is_a_usage_error_for_ls_and_warm(cli: Cli, tmp_path: Path, pattern: str) -> None:
    put_many(cli, tmp_path, 2)
    assert "'*'" in cli("ls", pattern, code=2).stderr
    assert "'*'" in cli("warm", pattern, "--to", str(tmp_path / "dst"), code=2).stderr
    assert not (tmp_path / "dst").exists()
    assert cli.json("ls", "*")["count"] == 2  # '*' still means everything


def test_store_ops_refuse_an_empty_pattern(cli: Cli, tmp_path: Path) -> None:
    put_many(cli, tmp_path, 2)
    with Store(str(cli.store)) as store:
        entries = store.entries()
    for pattern in ("", " "):
        with pytest.raises(ValueError, match=r"'\*'"):
            plan_evict(entries, pattern=pattern)
        with pytest.raises(ValueError, match=r"'\*'"):
            store_ops.select(entries, pattern=pattern)
    assert len(plan_evict(entries, pattern="*").victims) == 2


# -- 4. warm from a live store: chunks evicted after the listing are gone, not failed -------


def test_regression_warm_failed_on_chunks_the_source_evicted_after_listing(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = put_many(cli, tmp_path, 5)
    evicted = sorted(keys[1:3])
    real_select = store_ops.select

    def listing_then_the_server_evicts(*args: Any, **kw: Any) -> list[store_ops.ChunkEntry]:
        listed = real_select(*args, **kw)
        server_removes(cli.store, evicted)  # after warm listed the source, before it copies
        return listed

    monkeypatch.setattr(store_ops, "select", listing_then_the_server_evicts)
    res = cli.json("warm", "--to", str(tmp_path / "dst"))
    assert (res["copied"], res["failed"], res["gone"]) == (3, 0, 2)
    assert res["gone_keys"] == evicted and res["failures"] == []
    assert put_many(cli, tmp_path, 5) == keys  # the server put them back; again, human output
    r = cli("warm", "--to", str(tmp_path / "dst2"))
    assert "copied 3, skipped 0, failed 0, gone 2" in r.stdout and "error" not in r.stderr


def test_warm_counts_listed_chunks_missing_in_the_source_as_gone(cli: Cli, tmp_path: Path) -> None:
    keys = put_many(cli, tmp_path, 3)
    with Store(str(cli.store)) as src, Store(str(tmp_path / "dst")) as dst:
        listed = [e.key for e in src.entries()]
        server_removes(cli.store, [keys[0]])
        result = store_ops.warm(src, dst, listed, jobs=2, listed=True)
        assert (result.copied, result.failed, result.gone) == (2, [], [keys[0]])
        named = store_ops.warm(src, dst, [CacheEngineKey.from_string(keys[0])], jobs=1)
        assert named.gone == [] and named.failed == [(keys[0], "missing in the source")]


def test_warm_keys_naming_a_missing_chunk_is_still_a_failure(cli: Cli, tmp_path: Path) -> None:
    keys = put_many(cli, tmp_path, 2)
    absent = key("never-stored")
    res = cli.json("warm", "--to", str(tmp_path / "dst"), "--keys", "-", input="\n".join([*keys, absent]) + "\n", code=1)
    assert (res["copied"], res["failed"], res["gone"]) == (2, 1, 0)
    assert res["failures"] == [{"key": absent, "reason": "missing in the source"}]


# -- 5. errors of a write that fails ------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and EFBIG as on Linux")
def test_regression_get_onto_a_full_file_system_named_no_path(cli: Cli, tmp_path: Path) -> None:
    """A write the kernel refuses (here EFBIG under RLIMIT_FSIZE; ENOSPC reads alike) names the file."""
    (k,) = put_many(cli, tmp_path, 1)
    out = tmp_path / "out.safetensors"

    def small_files_only() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # Python ignores SIGXFSZ: writes fail

    proc = subprocess.run(
        [lmcache_exe(), "--store", str(cli.store), "get", k, "-o", str(out)],
        env=clean_env(tmp_path), capture_output=True, text=True, timeout=120, preexec_fn=small_files_only,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: writing {out}: File too large"), proc.stderr
    assert "::" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not out.exists() and list(tmp_path.glob(".out.safetensors.*")) == []  # no temp left


def test_an_os_error_without_a_file_name_reads_cleanly() -> None:
    from lmcache_cli.errors import describe_error

    message, code = describe_error(OSError(28, "No space left on device"))
    assert code == 1 and message.startswith("I/O error: No space left on device;")
    message, _ = describe_error(OSError(5, "Input/output error", "/x/y"))
    assert message.startswith("I/O error: /x/y: Input/output error;")


def block_write(root: Path, keys: list[str], i: int) -> None:
    """Make chunk ``i``'s write fail, as a full disk fails it: a file where its
    directory goes (no other chunk of ``keys`` lives there)."""
    shard = chunk_path(root, keys[i]).parent
    assert all(chunk_path(root, k).parent != shard for k in keys if k != keys[i])
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"")


def _prompt_of(tmp_path: Path, tokens: int) -> tuple[Path, Path, list[str]]:
    """A prompt of ``tokens`` ids, its KV file, and its chunks' keys at 16 tokens a chunk."""
    ids = list(range(tokens))
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps(ids))
    kv = tensor_file(tmp_path, "kv.safetensors", shape=(2, 2, tokens, 4, 8))
    return prompt, kv, [CacheEngineKey("vllm", MODEL, 1, 0, h).to_string() for h in chunk_hashes(ids, 16)]


def test_regression_put_tokens_failing_part_way_printed_no_json(cli: Cli, tmp_path: Path) -> None:
    prompt, kv, keys = _prompt_of(tmp_path, 64)
    assert len(keys) == 4
    block_write(cli.store, keys, 2)
    args = ["put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", "16"]
    r = cli(*args, "--format", "json", code=1)
    res = json.loads(r.stdout)
    assert res["stored"] == 2 and res["stored_keys"] == keys[:2] and res["chunks"] == 4
    assert res["failed"] == 2 and res["skipped"] == 0
    assert res["error"]["chunk"] == 2 and res["error"]["key"] == keys[2]
    assert r.stderr.startswith("error: chunk 2") and "1 chunk after it not written" in r.stderr
    assert all(chunk_path(cli.store, k).is_file() for k in keys[:2])
    assert not chunk_path(cli.store, keys[3]).exists()

    human = cli(*args, code=1)  # rerun: the two stored are skipped now
    assert "stored 0 of 4 chunks" in human.stderr and "2 already cached" in human.stderr
    assert "before the failure" in human.stderr and "error: chunk 2" in human.stderr
    os.unlink(chunk_path(cli.store, keys[2]).parent)
    done = cli.json(*args)
    assert done["stored_keys"] == keys[2:] and done["error"] is None and done["skipped"] == 2


def test_put_tokens_human_output_names_the_chunks_stored_before_a_failure(cli: Cli, tmp_path: Path) -> None:
    prompt, kv, keys = _prompt_of(tmp_path, 48)
    block_write(cli.store, keys, 1)
    r = cli("put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", "16", code=1)
    assert "stored 1 of 3 chunks" in r.stderr and "before the failure" in r.stderr
    assert f"stored chunks: 0 ({keys[0]})" in r.stderr



def test_warm_tells_stores_apart_by_what_their_display_hides() -> None:
    """warm refused --from and --to as "the same store" when their masked URLs matched:
    two Azure accounts' connection strings (account name included) mask the same."""
    from lmcache_core.store_ops import Store

    a = Store("az://lmcache/chunks?connection_string=AccountName=one;AccountKey=k1")
    b = Store("az://lmcache/chunks?connection_string=AccountName=two;AccountKey=k2")
    assert a.describe() == b.describe()  # the account is part of the hidden secret
    assert not a.same_place(b)
    assert a.same_place(Store("az://lmcache/chunks?connection_string=AccountName=one;AccountKey=k1"))
    assert Store("/tmp/x/../x").same_place(Store("/tmp/x"))


def test_a_chunk_gone_from_the_source_is_a_failure_while_the_destination_holds_a_bad_copy(tmp_path: Path) -> None:
    """'missing' (counted gone when the keys came from listing the source) was also
    returned when the destination held a bad copy that nothing could repair now."""
    from lmcache_core import layout
    from lmcache_core.store_ops import Store, copy_chunk

    key = CacheEngineKey("vllm", "m", 1, 0, "ab" * 32)
    (tmp_path / "src").mkdir()
    with Store(str(tmp_path / "src")) as src, Store(str(tmp_path / "dst")) as dst:
        assert copy_chunk(src, dst, key)[0] == "missing"  # nothing anywhere: gone
        bad = Path(layout.disk_path(str(tmp_path / "dst"), key))
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"truncated")
        outcome, _, reason = copy_chunk(src, dst, key)
        assert outcome == "failed" and "missing in the source" in reason and "bad" in reason
