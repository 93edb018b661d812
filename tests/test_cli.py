"""The `lmcache` command through Typer's CliRunner: every command and option,
json parsed and checked, exit codes, confirmation and masking."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lmcache_cli.commands import evict as evict_cmd
from lmcache_cli.main import app
from lmcache_core import chunk_format, layout
from lmcache_core.key import CacheEngineKey, chunk_hashes

MODEL = "test/llama"
KEY = f"vllm@{MODEL}@1@0@" + "ab" * 32


# Every test: no LMCACHE_* variable of the caller, a private default store.
pytestmark = pytest.mark.usefixtures("private_cli_env")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()  # read-only commands refuse a --store directory that does not exist
    return path


class Cli:
    """Runs `lmcache --store <store> ...` in process."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None, code: int | None = 0, store: bool = True) -> Any:
        argv = (["--store", str(self.store)] if store else []) + list(args)
        result = self.runner.invoke(app, argv, input=input)
        if code is not None:
            assert result.exit_code == code, (
                f"lmcache {' '.join(argv)} -> {result.exit_code}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}\nexception: {result.exception!r}"
            )
        return result

    def json(self, *args: str, code: int = 0, **kw: Any) -> Any:
        result = self(*args, "--format", "json", code=code, **kw)
        return json.loads(result.stdout)


@pytest.fixture
def cli(store: Path) -> Cli:
    return Cli(store)


def tensor_file(tmp_path: Path, name: str = "t.safetensors", shape: tuple[int, ...] = (2, 2, 16, 4, 8), seed: int = 0, **extra: torch.Tensor) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path = tmp_path / name
    tensors = {"x": torch.randn(shape, generator=gen).to(torch.bfloat16), **extra}
    save_file(tensors, str(path))
    return path


def key(i: int | str, model: str = MODEL, fmt: str = "vllm") -> str:
    import hashlib

    return CacheEngineKey(fmt, model, 1, 0, hashlib.sha256(str(i).encode()).hexdigest()).to_string()


def put_many(cli: Cli, tmp_path: Path, n: int, model: str = MODEL, shape: tuple[int, ...] = (2, 2, 16, 4, 8)) -> list[str]:
    keys = []
    for i in range(n):
        f = tensor_file(tmp_path, f"p{model.replace('/', '_')}{i}.safetensors", shape=shape, seed=i)
        k = key(i, model)
        cli("put", k, str(f))
        keys.append(k)
    return keys


def chunk_path(store: Path, k: str) -> Path:
    return store / layout.key_to_path(CacheEngineKey.from_string(k))


def set_times(path: Path, age_s: float) -> None:
    t = time.time() - age_s
    os.utime(path, (t, t))


# -- root ------------------------------------------------------------------------------


def test_help_lists_every_command(cli: Cli) -> None:
    out = cli("--help", store=False).stdout
    for name in ("put", "get", "ls", "show", "lookup", "warm", "evict", "verify", "stats", "bench", "config"):
        assert f"  {name} " in out
    assert "--store" in out and "--config" in out and "--format" in out and "--quiet" in out


def test_version(cli: Cli) -> None:
    from lmcache_core import __version__

    assert cli("--version", store=False).stdout.strip() == f"lmcache {__version__}"


def test_every_reporting_command_takes_format(cli: Cli) -> None:
    for name in ("put", "get", "ls", "show", "lookup", "warm", "evict", "verify", "stats", "bench", "config"):
        assert "--format" in cli(name, "--help").stdout, name


def test_store_and_config_together_is_usage_error(cli: Cli, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunk_size: 256\n")
    r = cli("--config", str(cfg), "ls", code=2)
    assert "--store or --config" in r.stderr


def test_unknown_option_is_one_line_usage_error(cli: Cli) -> None:
    r = cli("ls", "--bogus", code=2)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--bogus" in lines[0]


def test_default_store_is_under_user_cache_dir(tmp_path: Path) -> None:
    runner = CliRunner()
    data = json.loads(runner.invoke(app, ["config", "--format", "json"]).stdout)
    store = next(s for s in data["settings"] if s["name"] == "store")
    assert store["value"] == str(tmp_path / "xdg" / "lmcache")
    assert store["source"].startswith("default")


def test_store_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_STORE", str(tmp_path / "envstore"))
    f = tensor_file(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["put", KEY, str(f)]).exit_code == 0
    assert chunk_path(tmp_path / "envstore", KEY).is_file()
    data = json.loads(runner.invoke(app, ["config", "--format", "json"]).stdout)
    assert data["settings"][0]["source"] == "env LMCACHE_STORE"


# -- put / get -------------------------------------------------------------------------


def test_put_get_safetensors_roundtrip(cli: Cli, tmp_path: Path) -> None:
    f = tensor_file(tmp_path)
    res = cli.json("put", KEY, str(f))
    assert res["key"] == KEY and res["dtype"] == "bfloat16" and res["shape"] == [2, 2, 16, 4, 8]
    out = tmp_path / "out.safetensors"
    got = cli.json("get", KEY, "-o", str(out))
    assert got["bytes"] == out.stat().st_size
    back = load_file(str(out))
    assert list(back) == [chunk_format.TENSOR_NAME]
    assert torch.equal(back[chunk_format.TENSOR_NAME], load_file(str(f))["x"])


def test_put_human_message_goes_to_stderr_and_quiet_hides_it(cli: Cli, tmp_path: Path) -> None:
    f = tensor_file(tmp_path)
    r = cli("put", KEY, str(f))
    assert r.stdout == "" and "stored" in r.stderr
    r = cli("--quiet", "put", KEY, str(f))
    assert r.stdout == "" and r.stderr == ""


def test_put_npy_and_pt(cli: Cli, tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", arr)
    cli("put", key(1), str(tmp_path / "a.npy"))
    torch.save({"a": torch.ones(3), "b": torch.zeros(5)}, tmp_path / "two.pt")
    torch.save(torch.full((4,), 7.0), tmp_path / "one.pt")
    r = cli("put", key(2), str(tmp_path / "two.pt"), code=2)
    assert "--tensor" in r.stderr
    assert cli.json("put", key(2), str(tmp_path / "two.pt"), "--tensor", "b")["shape"] == [5]
    assert cli.json("put", key(3), str(tmp_path / "one.pt"))["shape"] == [4]
    out = tmp_path / "o.safetensors"
    cli("get", key(1), "-o", str(out))
    assert np.array_equal(load_file(str(out))["kv_chunk"].numpy(), arr)


def test_put_multi_tensor_safetensors_needs_tensor_name(cli: Cli, tmp_path: Path) -> None:
    f = tensor_file(tmp_path, y=torch.zeros(3))
    assert "--tensor" in cli("put", KEY, str(f), code=2).stderr
    cli("put", KEY, str(f), "--tensor", "y")
    assert "no tensor named 'z'" in cli("put", KEY, str(f), "--tensor", "z", code=1).stderr


def test_put_never_unpickles(cli: Cli, tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = cli("put", KEY, str(tmp_path / "obj.npy"), code=1)
    assert "pickle" in r.stderr
    import fractions

    torch.save({"t": torch.ones(2), "s": fractions.Fraction(1, 3)}, tmp_path / "obj.pt")
    r = cli("put", KEY, str(tmp_path / "obj.pt"), code=1)
    assert "weights_only" in r.stderr
    assert not cli.store.exists() or not list(cli.store.rglob("*.safetensors"))


def test_put_bad_inputs(cli: Cli, tmp_path: Path) -> None:
    f = tensor_file(tmp_path)
    assert "invalid key" in cli("put", "nope", str(f), code=2).stderr
    assert "not found" in cli("put", KEY, str(tmp_path / "missing.safetensors"), code=1).stderr
    (tmp_path / "x.txt").write_text("hi")
    assert "unsupported file type" in cli("put", KEY, str(tmp_path / "x.txt"), code=2).stderr
    cli("put", KEY, code=2)
    cli("put", "--tokens", "t.json", code=2)


def _prompt(tmp_path: Path, n: int, name: str = "prompt.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(list(range(1000, 1000 + n))))
    return p


def _kv(tmp_path: Path, tokens: int, name: str = "kv.safetensors") -> Path:
    path = tmp_path / name
    save_file({"kv": torch.randn(2, 2, tokens, 4, 8).to(torch.float16)}, str(path))
    return path


def test_lookup_on_disk_ends_at_the_chunk_get_tokens_cannot_use(cli: Cli, tmp_path: Path) -> None:
    """lookup checked only that each file existed: over emptied or truncated chunks it
    said "600 of 600 tokens" where `get --tokens` found no cached prefix."""
    prompt, kv = _prompt(tmp_path, 600), _kv(tmp_path, 600)
    cli.json("put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", "256")
    keys = [CacheEngineKey("vllm", MODEL, 1, 0, h) for h in chunk_hashes(list(range(1000, 1600)), 256)]
    paths = [layout.disk_path(str(cli.store), k) for k in keys]
    args = ("--tokens", str(prompt), "--model", MODEL, "--chunk-size", "256")
    out = tmp_path / "prefix.safetensors"

    def both() -> tuple[tuple[int, int], int]:
        look = cli.json("lookup", *args)
        got = cli.runner.invoke(app, ["--store", str(cli.store), "--format", "json", "get", *args, "-o", str(out)])
        return (look["tokens"], look["chunks"]), (json.loads(got.stdout)["tokens"] if got.exit_code == 0 else 0)

    assert both() == ((600, 3), 600)
    # The last chunk replaced by one of another length (100 tokens where 88 are left).
    odd = tensor_file(tmp_path, "odd.safetensors", shape=(2, 2, 100, 4, 8))
    cli("put", keys[2].to_string(), str(odd))
    assert both() == ((512, 2), 512)
    with open(paths[1], "r+b") as f:  # the second chunk loses its last byte
        f.truncate(os.path.getsize(paths[1]) - 1)
    assert both() == ((256, 1), 256)
    open(paths[0], "wb").close()  # the first is emptied
    assert both() == ((0, 0), 0)


def test_put_tokens_then_get_prefix_and_lookup(cli: Cli, tmp_path: Path) -> None:
    prompt, kv = _prompt(tmp_path, 600), _kv(tmp_path, 600)
    res = cli.json("put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", "256")
    assert (res["chunks"], res["stored"], res["skipped"], res["tokens"]) == (3, 3, 0, 600)
    again = cli.json("put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, "--chunk-size", "256")
    assert (again["stored"], again["skipped"]) == (0, 3)
    # Keys are the prefix hashes of the tokens.
    hashes = chunk_hashes(list(range(1000, 1600)), 256)
    listed = {e["chunk_hash"] for e in cli.json("ls")["chunks"]}
    assert listed == set(hashes)

    # The same prompt: all 600 tokens (the last chunk is partial) come back.
    out = tmp_path / "prefix.safetensors"
    got = cli.json("get", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", "256", "-o", str(out))
    assert (got["tokens"], got["total_tokens"], got["chunks"]) == (600, 600, 3)
    assert torch.equal(load_file(str(out))["kv"], load_file(str(kv))["kv"])

    # A longer prompt sharing the first 600 tokens: its third chunk (tokens 512-767)
    # is not the cached partial one, so the cached prefix is the two full chunks.
    longer = _prompt(tmp_path, 900, "longer.json")
    got = cli.json("get", "--tokens", str(longer), "--model", MODEL, "--chunk-size", "256", "-o", str(out))
    assert (got["tokens"], got["total_tokens"], got["chunks"]) == (512, 900, 2)
    assert torch.equal(load_file(str(out))["kv"], load_file(str(kv))["kv"][:, :, :512])
    human = cli("get", "--tokens", str(longer), "--model", MODEL, "--chunk-size", "256", "-o", str(out))
    assert "512 of 900 tokens" in human.stderr

    look = cli.json("lookup", "--tokens", str(longer), "--model", MODEL, "--chunk-size", "256")
    assert (look["tokens"], look["chunks"], look["total_tokens"], look["total_chunks"]) == (512, 2, 900, 4)
    assert look["per_tier"][0]["tokens"] == 512
    same = cli.json("lookup", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", "256")
    assert (same["tokens"], same["chunks"]) == (600, 3)
    assert "512 of 900 tokens" in cli("lookup", "--tokens", str(longer), "--model", MODEL, "--chunk-size", "256").stdout


def test_put_tokens_npy_and_world_size(cli: Cli, tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.arange(300, dtype=np.int64))
    kv = _kv(tmp_path, 300)
    res = cli.json(
        "put", "--tokens", str(tmp_path / "t.npy"), "--kv", str(kv), "--model", MODEL,
        "--world-size", "2", "--worker-id", "1", "--fmt", "vllm",
    )
    assert res["chunks"] == 2
    assert all(e["world_size"] == 2 and e["worker_id"] == 1 for e in cli.json("ls")["chunks"])


def test_tokens_commands_honour_fmt_and_rank(cli: Cli, tmp_path: Path) -> None:
    prompt = _prompt(tmp_path, 40)
    kv = tmp_path / "hf.safetensors"
    save_file({"kv": torch.randn(2, 2, 4, 40, 8)}, str(kv))  # huggingface: tokens on axis 3
    opts = ["--model", MODEL, "--fmt", "huggingface", "--chunk-size", "16", "--world-size", "2", "--worker-id", "1"]
    assert cli.json("put", "--tokens", str(prompt), "--kv", str(kv), *opts)["chunks"] == 3
    keys = [CacheEngineKey.from_string(e["key"]) for e in cli.json("ls")["chunks"]]
    assert {(k.fmt, k.world_size, k.worker_id) for k in keys} == {("huggingface", 2, 1)}
    look = cli.json("lookup", "--tokens", str(prompt), *opts)
    assert (look["tokens"], look["chunks"]) == (40, 3)
    # another rank or layout sees nothing
    assert cli.json("lookup", "--tokens", str(prompt), "--model", MODEL, "--chunk-size", "16")["tokens"] == 0
    out = tmp_path / "o.safetensors"
    got = cli.json("get", "--tokens", str(prompt), *opts, "-o", str(out))
    assert got["shape"] == [2, 2, 4, 40, 8]
    assert torch.equal(load_file(str(out))["kv"], load_file(str(kv))["kv"])


def test_put_tokens_shape_mismatch_is_one_line_error(cli: Cli, tmp_path: Path) -> None:
    r = cli("put", "--tokens", str(_prompt(tmp_path, 100)), "--kv", str(_kv(tmp_path, 99)), "--model", MODEL, code=1)
    assert r.stderr.count("\n") == 1 and "100 token ids" in r.stderr


def test_get_misses(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    assert "not in" in cli("get", KEY, "-o", str(out), code=1).stderr
    assert not out.exists()
    cli("get", KEY, code=2)  # no -o
    r = cli("get", "--tokens", str(_prompt(tmp_path, 10)), "--model", MODEL, "-o", str(out), code=1)
    assert "no cached prefix" in r.stderr and not out.exists()


# -- ls ----------------------------------------------------------------------------------


def test_ls_empty_store_is_success(cli: Cli) -> None:
    r = cli("ls")
    assert r.stdout.strip().startswith("0 chunks, 0 B total")
    data = cli.json("ls")
    assert data["count"] == 0 and data["chunks"] == []


def test_ls_filters_sort_limit_long_keys_only(cli: Cli, tmp_path: Path, store: Path) -> None:
    small = put_many(cli, tmp_path, 3, shape=(2, 2, 4, 4, 8))
    big = put_many(cli, tmp_path, 2, model="other", shape=(2, 2, 64, 4, 8))
    hf = key("hf", fmt="huggingface")
    cli("put", hf, str(tensor_file(tmp_path, "hf.safetensors", shape=(2, 2, 4, 8, 8))))
    for i, k in enumerate(small + big + [hf]):
        set_times(chunk_path(store, k), age_s=3600 * (i + 1))  # hf oldest, small[0] newest

    data = cli.json("ls")
    assert data["count"] == 6 and data["total_bytes"] == sum(e["size"] for e in data["chunks"])
    assert [e["key"] for e in data["chunks"]] == sorted(e["key"] for e in data["chunks"])

    assert {e["key"] for e in cli.json("ls", "--model", "other")["chunks"]} == set(big)
    assert [e["key"] for e in cli.json("ls", "--fmt", "huggingface")["chunks"]] == [hf]
    assert {e["key"] for e in cli.json("ls", "--larger-than", "16KiB")["chunks"]} == set(big)
    old = cli.json("ls", "--older-than", "4h30m")["chunks"]
    assert {e["key"] for e in old} == set(big[1:] + [hf])
    by_size = cli.json("ls", "--sort", "size")["chunks"]
    assert {by_size[0]["key"], by_size[1]["key"]} == set(big)
    by_age = cli.json("ls", "--sort", "age")["chunks"]
    assert by_age[0]["key"] == hf and by_age[-1]["key"] == small[0]
    limited = cli.json("ls", "--sort", "age", "--limit", "2")
    assert limited["count"] == 6 and limited["shown"] == 2 and len(limited["chunks"]) == 2

    glob = cli.json("ls", "vllm@other@*")["chunks"]
    assert {e["key"] for e in glob} == set(big)
    sub = cli.json("ls", "other@1@0@" + big[0][-64:-50])["chunks"]
    assert [e["key"] for e in sub] == [big[0]]

    long = cli.json("ls", "--long", "--model", "other")["chunks"]
    assert all(e["dtype"] == "BF16" and e["shape"] == [2, 2, 64, 4, 8] for e in long)
    human = cli("ls", "-l").stdout
    assert "DTYPE" in human and "2x2x64x4x8" in human
    assert human.strip().splitlines()[-1].startswith("6 chunks,")
    assert "GiB" in human or "KiB" in human

    keys_only = cli("ls", "-q", "--model", "other").stdout
    assert sorted(keys_only.split()) == sorted(big) and "chunks" not in keys_only


def test_ls_bad_size_and_age_are_usage_errors(cli: Cli) -> None:
    assert "--larger-than" in cli("ls", "--larger-than", "lots", code=2).stderr
    assert "--older-than" in cli("ls", "--older-than", "7x", code=2).stderr
    cli("ls", "--sort", "colour", code=2)


# -- show --------------------------------------------------------------------------------


def test_show_reports_header_checksum_and_values(cli: Cli, tmp_path: Path) -> None:
    t = torch.arange(2 * 2 * 4 * 2 * 3, dtype=torch.float32).reshape(2, 2, 4, 2, 3)
    t[0, 0, 0, 0, 0] = float("nan")
    t[1, 0, 0, 0, 0] = float("inf")
    t[1, 0, 0, 0, 1] = float("-inf")
    save_file({"x": t}, str(tmp_path / "v.safetensors"))
    cli("put", KEY, str(tmp_path / "v.safetensors"))
    data = cli.json("show", KEY, "--layers")
    assert data["fmt"] == "vllm" and data["model"] == MODEL and data["chunk_hash"] == "ab" * 32
    assert data["dtype"] == "F32" and data["shape"] == [2, 2, 4, 2, 3] and data["bytes"] == t.numel() * 4
    assert data["checksum_ok"] is True and data["checksum"].startswith("xxh3_128:")
    v = data["values"]["all"]
    assert (v["nan"], v["inf"]) == (1, 2)
    finite = t[torch.isfinite(t)].double()
    assert v["min"] == pytest.approx(float(finite.min())) and v["max"] == pytest.approx(float(finite.max()))
    assert v["mean"] == pytest.approx(float(finite.mean()))
    assert len(data["values"]["layers"]) == 2 and data["values"]["layers"][0]["nan"] == 1
    human = cli("show", KEY).stdout
    assert "verified" in human and "NaN / Inf" in human and "1 / 2" in human


def test_show_missing_and_corrupt(cli: Cli, tmp_path: Path, store: Path) -> None:
    assert "not in" in cli("show", KEY, code=1).stderr
    cli("put", KEY, str(tensor_file(tmp_path)))
    p = chunk_path(store, KEY)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    data = cli.json("show", KEY, code=1)
    assert data["checksum_ok"] is False and "mismatch" in data["checksum_status"]
    assert "checksum mismatch" in cli("show", KEY, code=1).stderr
    # get never hands out a corrupt chunk
    out = tmp_path / "bad.safetensors"
    assert "mismatch" in cli("get", KEY, "-o", str(out), code=1).stderr and not out.exists()


# -- warm --------------------------------------------------------------------------------


def test_warm_copies_skips_and_verifies(cli: Cli, tmp_path: Path) -> None:
    keys = put_many(cli, tmp_path, 4)
    dst = tmp_path / "dst"
    dry = cli.json("warm", "--to", str(dst), "--dry-run")
    assert dry["to_copy"] == 4 and sorted(dry["keys"]) == sorted(keys)
    assert not dst.exists() or not list(dst.rglob("*.safetensors"))
    res = cli.json("warm", "--from", str(cli.store), "--to", str(dst), "--jobs", "3")
    assert (res["copied"], res["skipped"], res["failed"]) == (4, 0, 0) and res["bytes"] > 0
    again = cli.json("warm", "--to", str(dst))
    assert (again["copied"], again["skipped"]) == (0, 4)
    human = cli("warm", "--to", str(dst)).stdout
    assert "copied 0, skipped 4, failed 0" in human and "GB/s" in human
    for k in keys:
        a, b = chunk_path(cli.store, k).read_bytes(), chunk_path(dst, k).read_bytes()
        assert a == b


def test_warm_pattern_model_and_keys_file(cli: Cli, tmp_path: Path) -> None:
    mine = put_many(cli, tmp_path, 2)
    other = put_many(cli, tmp_path, 2, model="other")
    d1, d2, d3 = tmp_path / "d1", tmp_path / "d2", tmp_path / "d3"
    assert cli.json("warm", "--to", str(d1), "--model", "other")["copied"] == 2
    assert {e["key"] for e in Cli(d1).json("ls")["chunks"]} == set(other)
    assert cli.json("warm", "--to", str(d2), f"vllm@{MODEL}@*")["copied"] == 2
    assert {e["key"] for e in Cli(d2).json("ls")["chunks"]} == set(mine)
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text(f"# chosen\n{mine[0]}\n\n{other[1]}\n")
    assert cli.json("warm", "--to", str(d3), "--keys", str(keyfile))["copied"] == 2
    # and from stdin, as `lmcache ls -q | lmcache warm --keys -`
    listing = cli("ls", "-q", "--model", "other").stdout
    res = cli.json("warm", "--to", str(d3), "--keys", "-", input=listing)
    assert (res["copied"], res["skipped"]) == (1, 1)
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-key\n")
    assert "line 1" in cli("warm", "--to", str(d3), "--keys", str(bad), code=2).stderr


def test_warm_failure_exits_1(cli: Cli, tmp_path: Path) -> None:
    keys = put_many(cli, tmp_path, 3)
    p = chunk_path(cli.store, keys[1])
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    res = cli.json("warm", "--to", str(tmp_path / "dst"), code=1)
    assert (res["copied"], res["failed"]) == (2, 1) and res["failures"][0]["key"] == keys[1]
    r = cli("warm", "--to", str(tmp_path / "dst2"), "--keys", "-", input=keys[1] + "\n", code=1)
    assert "failed 1" in r.stdout and r.stderr.startswith("error:")


def test_warm_to_unreachable_store_fails_without_leaking_the_password(cli: Cli, tmp_path: Path) -> None:
    put_many(cli, tmp_path, 1)
    r = cli("warm", "--to", "redis://user:pa55word@127.0.0.1:1/0", code=1)
    assert "pa55word" not in r.stdout + r.stderr
    assert r.stderr.startswith("error:") or "failed 1" in r.stdout


def test_global_format_applies_to_commands(cli: Cli, tmp_path: Path) -> None:
    put_many(cli, tmp_path, 1)
    assert json.loads(cli("--format", "json", "ls").stdout)["count"] == 1
    assert json.loads(cli("--format", "json", "stats").stdout)["chunks"] == 1
    # a command's own --format wins
    assert cli("--format", "json", "ls", "--format", "human").stdout.strip().endswith(str(cli.store))


def test_warm_usage_errors(cli: Cli, tmp_path: Path) -> None:
    cli("warm", code=2)
    cli("warm", "--to", str(cli.store), code=2)  # same store both sides


# -- evict -------------------------------------------------------------------------------


def test_evict_refuses_without_yes_and_terminal(cli: Cli, tmp_path: Path) -> None:
    keys = put_many(cli, tmp_path, 3)
    r = cli("evict", "*", code=1)
    assert "refusing" in r.stderr and "--yes" in r.stderr and "plan: remove 3 chunks" in r.stdout
    assert len(cli.json("ls")["chunks"]) == 3
    data = cli.json("evict", "*", "--yes")
    assert data["removed"] == 3 and data["bytes_freed"] > 0 and data["plan"]["chunks"] == 3
    assert cli.json("ls")["count"] == 0
    assert {v["key"] for v in data["plan"]["victims"]} == set(keys)


def test_evict_dry_run_and_nothing_to_do(cli: Cli, tmp_path: Path) -> None:
    put_many(cli, tmp_path, 2)
    data = cli.json("evict", "--model", MODEL, "--dry-run")
    assert data["dry_run"] is True and data["plan"]["chunks"] == 2 and data["removed"] == 0
    assert cli.json("ls")["count"] == 2
    assert "nothing to evict" in cli("evict", "--model", "absent").stderr
    assert "PATTERN" in cli("evict", code=2).stderr


def test_evict_older_than_and_to_size_lru(cli: Cli, tmp_path: Path, store: Path) -> None:
    keys = put_many(cli, tmp_path, 5)
    for i, k in enumerate(keys):
        set_times(chunk_path(store, k), age_s=86400 * (10 - i))  # keys[0] least recently used
    size = chunk_path(store, keys[0]).stat().st_size
    old = cli.json("evict", "--older-than", "7d", "--dry-run")
    assert {v["key"] for v in old["plan"]["victims"]} == set(keys[:4])
    plan = cli.json("evict", "--to-size", str(size * 2), "--dry-run")["plan"]
    assert [v["key"] for v in plan["victims"]] == keys[:3]
    assert plan["bytes_after"] <= size * 2
    done = cli.json("evict", "--to-size", str(size * 2), "--yes")
    assert done["removed"] == 3
    assert {e["key"] for e in cli.json("ls")["chunks"]} == set(keys[3:])


def test_evict_confirm_prompt(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_many(cli, tmp_path, 2)
    monkeypatch.setattr(evict_cmd, "stdin_is_terminal", lambda: True)
    r = cli("evict", "*", input="n\n")
    assert "cancelled" in r.stderr and cli.json("ls")["count"] == 2
    r = cli("evict", "*", input="y\n")
    assert "removed 2 chunks" in r.stdout and cli.json("ls")["count"] == 0


# -- verify ------------------------------------------------------------------------------


def test_verify_clean_corrupt_temp_and_fix(cli: Cli, tmp_path: Path, store: Path) -> None:
    keys = put_many(cli, tmp_path, 3)
    ok = cli.json("verify")
    assert (ok["checked"], ok["ok"], ok["problems_left"]) == (3, 3, 0)
    p = chunk_path(store, keys[0])
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x01
    p.write_bytes(bytes(raw))
    trunc = chunk_path(store, keys[1])
    trunc.write_bytes(trunc.read_bytes()[:50])
    stray = p.parent / ".x.safetensors.deadhost.12345.0.tmp"
    stray.write_bytes(b"partial")
    set_times(stray, 7200)
    live = p.parent / f".y.safetensors.{_host()}.{os.getpid()}.0.tmp"
    live.write_bytes(b"being written")
    bad = cli.json("verify", code=1)
    assert bad["ok"] == 1 and {b["chunk"] for b in bad["bad"]} == {keys[0], keys[1]}
    assert bad["problems_left"] == 3
    assert {(Path(t["path"]).name, t["stale"]) for t in bad["temp_files"]} == {(stray.name, True), (live.name, False)}
    human = cli("verify", code=1)
    assert "checksum mismatch" in human.stdout and "--fix" in human.stderr
    fixed = cli.json("verify", "--fix", "--jobs", "2")
    assert fixed["problems_left"] == 0 and len(fixed["removed"]) == 3
    assert not p.exists() and not trunc.exists() and not stray.exists() and live.exists()
    assert cli.json("verify")["checked"] == 1


def test_fifo_at_a_chunk_path_never_hangs(cli: Cli, tmp_path: Path, store: Path) -> None:
    cli("put", KEY, str(tensor_file(tmp_path)))
    fifo_key = key("fifo")
    fifo = chunk_path(store, fifo_key)
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    assert "not a regular file" in cli("show", fifo_key, code=1).stderr
    assert "not a regular file" in cli("get", fifo_key, "-o", str(tmp_path / "f.safetensors"), code=1).stderr
    assert [e["key"] for e in cli.json("ls")["chunks"]] == [KEY]
    bad = cli.json("verify", code=1)
    assert [b["chunk"] for b in bad["bad"]] == [str(fifo)] and "regular" in bad["bad"][0]["reason"]
    assert cli.json("verify", "--fix")["problems_left"] == 0 and not os.path.lexists(fifo)


def _host() -> str:
    """Who wrote a temp file, as its name spells it (host and PID namespace)."""
    from lmcache_core.layout import WRITER_ID

    return WRITER_ID


# -- stats / config ----------------------------------------------------------------------


def test_stats(cli: Cli, tmp_path: Path) -> None:
    assert cli.json("stats")["chunks"] == 0
    put_many(cli, tmp_path, 3)
    put_many(cli, tmp_path, 2, model="other")
    data = cli.json("stats")
    assert data["chunks"] == 5 and data["bytes"] > 0
    assert {m["name"]: m["chunks"] for m in data["models"]} == {MODEL: 3, "other": 2}
    assert data["fmts"] == [{"name": "vllm", "chunks": 5, "bytes": data["bytes"]}]
    assert data["oldest"] <= data["newest"]
    human = cli("stats").stdout
    assert "MODEL" in human and "other" in human and "oldest" in human


def test_config_sources_and_masked_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text(
        "chunk_size: 128\nlocal_device: cpu\nmax_local_cache_size: 1\n"
        "remote_url: redis://admin:hunter2@cache.example:6379/0\n"
    )
    monkeypatch.setenv("LMCACHE_REMOTE_TIMEOUT", "2.5")
    runner = CliRunner()
    r = runner.invoke(app, ["--config", str(cfg), "config", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    assert "hunter2" not in r.stdout
    rows = {s["name"]: s for s in json.loads(r.stdout)["settings"]}
    assert rows["chunk_size"]["value"] == 128 and rows["chunk_size"]["source"] == f"file {cfg}"
    assert rows["remote_url"]["value"] == "redis://admin:***@cache.example:6379/0"
    assert rows["remote_timeout"]["value"] == 2.5 and rows["remote_timeout"]["source"] == "env LMCACHE_REMOTE_TIMEOUT"
    assert rows["config_file"]["value"] == str(cfg) and rows["config_file"]["source"] == "--config"
    assert rows["max_local_disk_size"]["source"] == "default"
    human = runner.invoke(app, ["--config", str(cfg), "config"])
    assert "hunter2" not in human.stdout and "***" in human.stdout
    r = runner.invoke(app, ["--store", "redis://u:s3cret@127.0.0.1:9/0", "config"])
    assert "s3cret" not in r.stdout and "u:***@" in r.stdout


def test_invalid_config_is_one_line_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("chunk_size: -3\n")
    r = CliRunner().invoke(app, ["--config", str(cfg), "ls"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "chunk_size" in r.stderr


def test_tiered_store_from_config(tmp_path: Path) -> None:
    disk = tmp_path / "tier-disk"
    cfg = tmp_path / "tiered.yaml"
    cfg.write_text(f"local_device: cpu\nlocal_disk: {disk}\nmax_local_cache_size: 0.1\nmax_local_disk_size: 0.1\n")
    tiered = Cli(tmp_path / "unused")
    base = ["--config", str(cfg)]
    f = tensor_file(tmp_path)
    tiered(*base, "put", KEY, str(f), store=False)
    assert chunk_path(disk, KEY).is_file()  # written through to disk
    data = json.loads(tiered(*base, "ls", "--format", "json", store=False).stdout)
    # A server's memory tier is its own RAM: a tool sees the config's disk directory.
    assert [e["key"] for e in data["chunks"]] == [KEY] and data["store"] == f"disk {disk}"
    prompt, kv = _prompt(tmp_path, 300), _kv(tmp_path, 300)
    tiered(*base, "put", "--tokens", str(prompt), "--kv", str(kv), "--model", MODEL, store=False)
    look = json.loads(tiered(*base, "lookup", "--tokens", str(prompt), "--model", MODEL, "--format", "json", store=False).stdout)
    assert look["per_tier"] == [{"tier": f"disk {disk}", "tokens": 300, "chunks": 2}] and look["tokens"] == 300


# -- errors ------------------------------------------------------------------------------


def test_unreachable_remote_is_one_masked_line(cli: Cli) -> None:
    r = cli.runner.invoke(app, ["--store", "redis://user:topsecret@127.0.0.1:1/0", "ls"])
    assert r.exit_code == 1
    assert "topsecret" not in r.stderr and "topsecret" not in r.stdout
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1


def test_unknown_scheme_is_one_line(cli: Cli) -> None:
    r = cli.runner.invoke(app, ["--store", "nosuch://x/y", "ls"])
    assert r.exit_code == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1


def test_debug_env_lets_the_traceback_through(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_DEBUG", "1")
    r = cli.runner.invoke(app, ["--store", "nosuch://x/y", "ls"])
    assert r.exit_code == 1 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_describe_error_table_masks_and_maps() -> None:
    from lmcache_cli.errors import describe_error
    from lmcache_core.errors import StoreFullError, StoreUnavailableError

    msg, code = describe_error(StoreUnavailableError("redis://a:pw@h:1/0", "timed out"))
    assert code == 1 and "pw" not in msg and "check the URL" in msg
    assert "evict" in describe_error(StoreFullError("disk /x", "no space"))[0]
    assert "LMCACHE_DEBUG" in describe_error(RuntimeError("boom"))[0]
    assert "/nope" in describe_error(FileNotFoundError(2, "No such file", "/nope"))[0]


# -- bench -------------------------------------------------------------------------------


def test_bench_quick_json_cleans_up(cli: Cli, tmp_path: Path) -> None:
    data = cli.json("bench", "--chunk-mb", "0.25", "--count", "2", "--batch", "2")
    ops = {r["op"] for r in data["rows"]}
    assert {"put", "get"} <= ops and not data["errors"]
    for r in data["rows"]:
        assert r["gbps"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert {"store", "op", "gbps", "p50_ms", "p99_ms", "raw_op", "raw_gbps", "ratio"} <= set(r)
    assert not list(cli.store.rglob("*.safetensors"))


def test_bench_human_table_and_stores_option(cli: Cli, tmp_path: Path) -> None:
    r = cli("bench", "-s", "cpu://", "--kv-shape", "2,2,16,4,8", "--count", "2", "--batch", "2")
    assert "GB/s" in r.stdout and "RATIO" in r.stdout and "cpu://" in r.stdout
    quick = cli.json("bench", "--quick", "--chunk-mb", "0.25", "--dtype", "float16")
    assert quick["params"]["dtype"] == "float16" and quick["params"]["count"] == 8
    assert "dtype 'float17': one of" in cli("bench", "--quick", "--chunk-mb", "0.25", "--dtype", "float17", code=2).stderr
    cli("bench", "--kv-shape", "2,3,4", code=2)
    cli("bench", "--kv-shape", "2,2,16,4,8", "--chunk-mb", "1", code=2)
    # A size that is no whole number of elements is rounded down to one (it was refused,
    # naming a byte count nobody typed: 0.01 MiB is 10485.76 bytes).
    tiny = cli.json("bench", "-s", "cpu://", "--chunk-mb", "0.01", "--count", "2", "--batch", "2")
    assert tiny["params"]["chunk_bytes"] == 10484 and not tiny["errors"]


# -- units -------------------------------------------------------------------------------


def test_sizes_and_ages_parse_and_print() -> None:
    from lmcache_cli.units import human_age, human_size, parse_age, parse_size, plural

    assert parse_size("1024") == 1024 and parse_size("512K") == 512 * 1024
    assert parse_size("1.5GiB") == parse_size("1.5 GB") == int(1.5 * 1024**3)
    assert parse_size("10mb") == 10 * 1024**2
    for bad in ("", "lots", "1.5 XB", "-3M"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_age("90s") == 90 and parse_age("12h") == 12 * 3600 and parse_age("7d") == 7 * 86400
    assert parse_age("1d12h") == 36 * 3600 and parse_age("2w") == 14 * 86400
    for bad in ("", "7", "7x", "d7", "1d 2"):
        with pytest.raises(ValueError):
            parse_age(bad)
    assert human_size(312) == "312 B" and human_size(1536) == "1.5 KiB"
    assert human_size(int(1.5 * 1024**3)) == "1.5 GiB" and human_size(None) == "-"
    assert (human_age(5), human_age(125), human_age(7200), human_age(3 * 86400)) == ("5s", "2m", "2h", "3d")
    assert plural(1, "chunk") == "1 chunk" and plural(0, "chunk") == "0 chunks"
