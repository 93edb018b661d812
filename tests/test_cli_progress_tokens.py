"""Progress on ``lookup`` and ``get --tokens``: the library's hooks (``prefix_lookup``,
``read_prefix``) count a prompt's chunks up to their total, and the CLI's bar on a
terminal leaves results, and JSON on stdout, exactly as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lmcache_core.config import LMCacheEngineConfig
from lmcache_core.store_ops import Store, prefix_lookup, read_prefix
from lmcache_core.tokens import ChunkedKVStore
from tests.test_cli_audit4 import on_pty, on_terminal
from tests.test_cli_audit_fixes import lmcache

pytestmark = pytest.mark.usefixtures("private_cli_env")

CHUNK = 16
MODEL = "org/m"
CACHED = list(range(1000, 1100))  # 100 tokens: 7 chunks (the last of 4 tokens)
PARTLY = CACHED[:40] + [7] * 60  # the first 2 chunks cached, then a miss


def _put_prompt(store: Store) -> int:
    """Store ``CACHED``'s KV; the bytes of its chunks."""
    kv = torch.randn(2, 2, len(CACHED), 4, 8, generator=torch.Generator().manual_seed(3))
    result = ChunkedKVStore(store.backend, MODEL, chunk_size=CHUNK).store(CACHED, kv)
    assert result.stored == 7
    return result.nbytes


def _disk_store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    with Store(str(path)) as store:
        _put_prompt(store)
    return path


def _tiered_config(tmp_path: Path) -> LMCacheEngineConfig:
    disk, remote = tmp_path / "disk", tmp_path / "remote"
    disk.mkdir()
    remote.mkdir()
    return LMCacheEngineConfig(local_device=None, local_disk=str(disk), remote_url=f"fsspec+file://{remote}")


def _assert_counts_up_to(calls: list[tuple[int, ...]], total: int) -> None:
    done = [c[0] for c in calls]
    assert calls, "progress was never called"
    assert all(c[1] == total for c in calls), calls
    assert done == sorted(set(done)), f"not strictly increasing: {done}"
    assert done[0] >= 1 and done[-1] == total, done


# -- the library's hooks ------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, cached", [(CACHED, 100), (PARTLY, 32), ([5] * 50, 0)], ids=["all", "part", "none"])
def test_prefix_lookup_progress_counts_chunks_to_the_total(tmp_path: Path, tokens: list[int], cached: int) -> None:
    path = _disk_store(tmp_path)
    calls: list[tuple[int, int]] = []
    with Store(str(path)) as store:
        plain = prefix_lookup(store, tokens, model=MODEL, chunk_size=CHUNK)
        found = prefix_lookup(store, tokens, model=MODEL, chunk_size=CHUNK, progress=lambda *a: calls.append(a))
    assert found == plain and found["tokens"] == cached
    _assert_counts_up_to(calls, -(-len(tokens) // CHUNK))
    if cached == 100:
        assert [c[0] for c in calls] == list(range(1, 8))  # one call per chunk


def test_prefix_lookup_progress_on_a_tiered_store_counts_each_chunk_once(tmp_path: Path) -> None:
    """Two tiers, each read per chunk: the count is the prompt's chunks, not tiers x chunks."""
    with Store(config=_tiered_config(tmp_path)) as store:
        _put_prompt(store)
        calls: list[tuple[int, int]] = []
        found = prefix_lookup(store, CACHED, model=MODEL, chunk_size=CHUNK, progress=lambda *a: calls.append(a))
        assert {t["tier"]: t["tokens"] for t in found["per_tier"]} == {"disk": 100, "remote": 100}
    assert [c[0] for c in calls] == list(range(1, 8))
    _assert_counts_up_to(calls, 7)


@pytest.mark.parametrize("tokens, cached", [(CACHED, 100), (PARTLY, 32), ([5] * 50, 0)], ids=["all", "part", "none"])
def test_read_prefix_progress_counts_chunks_and_bytes_to_the_total(tmp_path: Path, tokens: list[int], cached: int) -> None:
    path = _disk_store(tmp_path)
    calls: list[tuple[int, int, int]] = []
    with Store(str(path)) as store:
        plain = read_prefix(store, tokens, model=MODEL, chunk_size=CHUNK)
        found = read_prefix(store, tokens, model=MODEL, chunk_size=CHUNK, jobs=3, progress=lambda *a: calls.append(a))
    assert found.tokens == plain.tokens == cached
    assert len(found.chunks) == len(plain.chunks)
    if plain.chunks:
        assert torch.equal(found.joined(), plain.joined())  # type: ignore[arg-type]
    _assert_counts_up_to(calls, -(-len(tokens) // CHUNK))
    nbytes = [c[2] for c in calls]
    assert nbytes == sorted(nbytes)
    assert nbytes[-1] == sum(c.numel() * c.element_size() for c in found.chunks)


def test_read_prefix_progress_on_a_tiered_store(tmp_path: Path) -> None:
    with Store(config=_tiered_config(tmp_path)) as store:
        stored_bytes = _put_prompt(store)
        calls: list[tuple[int, int, int]] = []
        found = read_prefix(store, CACHED, model=MODEL, chunk_size=CHUNK, progress=lambda *a: calls.append(a))
    assert found.tokens == 100
    assert [c[0] for c in calls] == list(range(1, 8))
    assert calls[-1] == (7, 7, stored_bytes)


# -- the CLI: results and JSON unchanged, a bar on a terminal -----------------------------------------


def _prompt_file(tmp_path: Path, tokens: list[int]) -> Path:
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(tokens))
    return path


def _stderr_on_terminal(args: list[str]) -> tuple[int, str, str]:
    """``lmcache ARGS`` with stderr on a pseudo-terminal (bars drawn) and stdout piped;
    (exit code, stdout, stderr)."""
    return on_pty(args, pipe_stdout=True)


def _prefix_file(path: Path) -> tuple[bytes, dict[str, str] | None]:
    """A written prefix: its tensor's bytes and its metadata (the header's key order may differ)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("kv").numpy().tobytes(), f.metadata()


def _frames(output: str, description: str) -> list[str]:
    return [f for f in re.split(r"[\r\n]+", output) if f.lstrip().startswith(description + " ")]


@pytest.mark.parametrize("tokens", [CACHED, PARTLY], ids=["all", "part"])
def test_lookup_json_on_a_terminal_is_clean_and_unchanged(tmp_path: Path, tokens: list[int]) -> None:
    store = str(_disk_store(tmp_path))
    args = ["--store", store, "lookup", "--tokens", str(_prompt_file(tmp_path, tokens)), "-m", MODEL,
            "--chunk-size", str(CHUNK), "--format", "json"]  # fmt: skip
    expected = json.loads(lmcache(*args).stdout)  # no terminal: no bar

    code, stdout, stderr = _stderr_on_terminal(args)

    assert code == 0, stderr
    assert json.loads(stdout) == expected  # the whole of stdout is the document
    frames = _frames(stderr, "lookup")
    assert frames and "7/7 chunks" in frames[-1] and "100%" in frames[-1], stderr
    assert " B" not in frames[-1]  # lookup reads no payloads: no byte count


def test_get_tokens_json_on_a_terminal_is_clean_and_writes_the_same_prefix(tmp_path: Path) -> None:
    store = str(_disk_store(tmp_path))
    prompt = str(_prompt_file(tmp_path, PARTLY))
    base = ["--store", store, "get", "--tokens", prompt, "-m", MODEL, "--chunk-size", str(CHUNK), "--format", "json"]
    plain_file, bar_file = tmp_path / "plain.safetensors", tmp_path / "bar.safetensors"
    expected = json.loads(lmcache(*base, "-o", str(plain_file)).stdout)

    code, stdout, stderr = _stderr_on_terminal([*base, "-o", str(bar_file)])

    assert code == 0, stderr
    got = json.loads(stdout)
    assert got.pop("output") == str(bar_file) and expected.pop("output") == str(plain_file)
    assert got == expected and got["tokens"] == 32
    assert _prefix_file(bar_file) == _prefix_file(plain_file)
    frames = _frames(stderr, "get")
    assert frames and "7/7 chunks" in frames[-1] and "read" in frames[-1], stderr


def test_lookup_and_get_tokens_show_a_bar_for_a_person_and_none_with_quiet(tmp_path: Path) -> None:
    store = str(_disk_store(tmp_path))
    prompt = str(_prompt_file(tmp_path, CACHED))
    lookup = ["--store", store, "lookup", "--tokens", prompt, "-m", MODEL, "--chunk-size", str(CHUNK)]
    get = ["--store", store, "get", "--tokens", prompt, "-m", MODEL, "--chunk-size", str(CHUNK),
           "-o", str(tmp_path / "p.safetensors")]  # fmt: skip

    code, output = on_terminal(lookup)
    assert code == 0, output
    assert "7/7 chunks" in _frames(output, "lookup")[-1]
    assert "cached prefix: 100 of 100 tokens" in output
    code, output = on_terminal(get)
    assert code == 0, output
    assert "7/7 chunks" in _frames(output, "get")[-1]

    for args in (lookup, get):
        code, output = on_terminal(["--quiet", *args])
        assert code == 0, output
        assert not _frames(output, args[2]), output
