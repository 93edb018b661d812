"""Hostile keys and model names, on every backend case.

Promise: a key either round-trips exactly (put, get bytes-equal, contains,
list, remove) or is refused with ``ValueError``; nothing is ever created
outside the store root, and no other exception escapes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from lmcache_core.key import CacheEngineKey
from lmcache_core.layout import key_to_path, path_to_key

H = hashlib.sha256(b"hostile").hexdigest()

def hostile_model_names(base: Path) -> list[str]:
    """Names an attacker (or a careless operator) might pass as a model name."""
    return [
        "../../x",
        "../../../../../../../../" + str(base / "escaped-rel").lstrip("/"),
        str(base / "escaped-abs"),  # an absolute path
        "/etc/passwd",
        "a/../../b",
        "..",
        ".",
        "./.",
        "...",
        "~/x",
        "$HOME/x",
        "..%2F..%2Fx",  # pre-encoded traversal
        "%2e%2e",
        "%",
        "a\\..\\..\\b",
        "x\x00y",  # NUL
        "x\ny",
        "\x7f",
        "x" * 10_000,  # 10 kB
        "é" * 10_000,
        "\U0001F600" * 512,  # 512 four-byte characters: too long once path-encoded
        "\U0001F600" * 100,
        "x" * 512,
        "ｍｏｄｅｌ／ｘ",  # full-width look-alikes
        "．．／．．／x",  # full-width dots and slash
        "model\u2215x",  # DIVISION SLASH
        "model\u2044x",  # FRACTION SLASH
        "\u202emodel",  # right-to-left override
        "\ufeffmodel",  # BOM
        "model\u200b",  # zero-width space
        "\ud800",  # lone surrogate
        "*",  # Redis glob characters
        "model*",
        "m?del",
        "[a-z]*",
        "\\*",
        "a:b:*",
        "a@b",  # the key separator
        "CON",
        "x.",
        " ",
        "meta-llama/Llama-3.1-8B-Instruct",
    ]


def _files_under(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


@pytest.mark.cases(plain_only=True)  # pipelined twins share the plain case's key paths
def test_hostile_model_names_round_trip_or_value_error(open_store, case, tmp_path):
    base = tmp_path / "outside"
    base.mkdir()
    store = open_store()
    before_parent = set(os.listdir(tmp_path.parent))
    value = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 2, 2)
    stored: list[CacheEngineKey] = []
    refused = 0
    for i, name in enumerate(hostile_model_names(base)):
        h = hashlib.sha256(f"{i}".encode()).hexdigest()
        try:
            key = CacheEngineKey("vllm", name, 1, 0, h)
        except ValueError:
            refused += 1
            continue
        try:
            store.put(key, value)
        except ValueError:
            refused += 1
            for probe in (store.get, store.contains):
                try:
                    assert not probe(key)
                except ValueError:
                    pass
            continue
        got = store.get(key)
        assert got is not None and torch.equal(got.cpu(), value), name[:40]
        assert store.contains(key)
        stored.append(key)
    try:
        listed = set(store.list())
    except NotImplementedError:
        listed = set(stored)
    assert set(stored) <= listed
    # Nothing escaped the store: no file anywhere but under the case's own store dirs.
    assert _files_under(base) == set()
    assert not Path("/etc/passwd.safetensors").exists()
    assert set(os.listdir(tmp_path.parent)) == before_parent
    # A traversal would show up as a raw path component named after its target.
    raw_targets = {"escaped-rel", "escaped-abs", "x", "b", "passwd", ".."}
    assert not any(raw_targets & set(Path(p).relative_to(tmp_path).parts) for p in _files_under(tmp_path))
    for key in stored:
        assert store.remove(key)
        assert store.get(key) is None
    assert refused >= 5  # NUL, newline, 10 kB, '@', lone surrogate at least


@pytest.mark.parametrize(
    "text",
    [
        "vllm@../../x@1@0@" + H,
        "vllm@m@1@0@../../x",
        "vllm@m@1@0@" + "A" * 64,  # uppercase hash
        "vllm@m@1@0@" + "a" * 129,
        "vllm@m@1@0@",
        "vllm@m@01@0@" + H,
        "vllm@m@1@ 0@" + H,
        "vllm@m@1@-1@" + H,
        "vllm@m@1@1@" + H,
        "vllm@m@1@0@" + H + "@x",
        "tf@m@1@0@" + H,
        "vllm@m@١@0@" + H,  # Arabic-Indic digit one
        "vllm@@1@0@" + H,
        "vllm@m\x00@1@0@" + H,
        "x" * 10_000,
        "",
    ],
)
def test_hostile_key_strings_are_value_errors(text):
    try:
        key = CacheEngineKey.from_string(text)
    except ValueError:
        return
    # Anything accepted must be canonical: it maps back to exactly the same text.
    assert key.to_string() == text
    assert ".." not in key_to_path(key).split("/")


@pytest.mark.parametrize("bad_hash", ["../x", "/x", "a/b", "", "ab\x00", "g" * 64, "AB", "a" * 129])
def test_hostile_chunk_hashes_are_value_errors(bad_hash):
    with pytest.raises(ValueError, match="chunk_hash"):
        CacheEngineKey("vllm", "m", 1, 0, bad_hash)


def test_every_stored_path_maps_back_to_its_key(tmp_path):
    """Reversibility for every hostile name that is accepted: path -> key without reading."""
    for i, name in enumerate(hostile_model_names(tmp_path)):
        try:
            key = CacheEngineKey("huggingface", name, 4, 3, f"{i:02x}" * 8)
            path = key_to_path(key)
        except ValueError:
            continue
        assert path_to_key(path) == key
        assert all(part not in ("", ".", "..") for part in path.split("/"))
        assert len(path) < 2400 and all(len(p.encode()) <= 255 for p in path.split("/"))


def test_regression_long_unicode_model_name_gave_enametoolong(tmp_path):
    """Bug: 512 emoji encode to a 6 kB path; put raised OSError(ENAMETOOLONG), not ValueError.

    Now the key itself is refused (model names are bounded in UTF-8 bytes too), so
    every backend agrees and a hybrid never half-stores such a key.
    """
    with pytest.raises(ValueError, match="model_name"):
        CacheEngineKey("vllm", "\U0001F600" * 512, 1, 0, H)
    longest = "\U0001F600" * 256  # 1024 bytes: accepted, and its path fits
    path = key_to_path(CacheEngineKey("vllm", longest, 1, 0, "ab" * 64))
    assert len(str(tmp_path)) + len(path) < 4096 - 700
    from lmcache_core import LMCacheEngineConfig
    from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path))
    store = LMCLocalDiskBackend(cfg, None, "cpu")
    key = CacheEngineKey("vllm", longest, 1, 0, H)
    store.put(key, torch.ones(4))
    assert torch.equal(store.get(key), torch.ones(4))
    assert store.list() == [key]
    store.close()


DOT_RUN_NAMES = ["m" + "." * 250, "a" * 100 + "." * 200, "." * 512, "x" * 199 + "..", "é" * 200 + "." * 300]


def test_regression_a_long_run_of_dots_in_a_model_name_hung_path_encoding(tmp_path):
    """Bug: splitting a long encoded name backed the cut up over a run of dots (a
    segment may not start with '.') until it reached 0, then looped forever: every
    put and get of such a key hung its thread (on a remote, one I/O thread each,
    until the store served nothing). Run in a child so a regression fails, not hangs."""
    import subprocess
    import sys

    script = (
        "from lmcache_core.key import CacheEngineKey\n"
        "from lmcache_core.layout import key_to_path, path_to_key\n"
        f"for i, name in enumerate({DOT_RUN_NAMES!r}):\n"
        "    key = CacheEngineKey('vllm', name, 1, 0, f'{i:02x}' * 8)\n"
        "    path = key_to_path(key)\n"
        "    assert path_to_key(path) == key, name\n"
        "    assert all(p not in ('', '.', '..') and len(p.encode()) <= 255 for p in path.split('/')), path\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-500:]
    from lmcache_core import LMCacheEngineConfig
    from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend

    store = LMCLocalDiskBackend(LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(tmp_path)), None, "cpu")
    keys = [CacheEngineKey("vllm", name, 1, 0, H) for name in DOT_RUN_NAMES]
    for i, key in enumerate(keys):
        store.put(key, torch.full((4,), float(i)))
    assert all(torch.equal(store.get(k), torch.full((4,), float(i))) for i, k in enumerate(keys))
    assert sorted(store.list(), key=str) == sorted(keys, key=str)
    store.close()
