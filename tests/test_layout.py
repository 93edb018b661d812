"""Store layout: reversible, listable per model, bounded, traversal-proof."""

from __future__ import annotations

import posixpath

import pytest

from lmcache_core import CacheEngineKey
from lmcache_core.layout import decode_model, disk_path, encode_model, key_to_path, model_prefix, path_to_key

H = "0f" * 32
NAMES = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "../../etc/passwd",
    "/abs/path/model",
    ".",
    "..",
    ".hidden",
    "a%2Fb",
    "ｍｏｄｅｌ／ｘ",  # full-width look-alikes
    "model*?[x]\\",
    "x" * 512,
    "é" * 300,
    "a b+c",
]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_round_trip_and_no_traversal(name):
    key = CacheEngineKey("vllm", name, 8, 5, H)
    path = key_to_path(key)
    assert path_to_key(path) == key
    assert decode_model(encode_model(name)) == name
    parts = path.split("/")
    assert all(p not in ("", ".", "..") for p in parts)
    assert not path.startswith("/")
    assert posixpath.normpath(path) == path
    assert all(len(p.encode()) <= 255 for p in parts)
    assert path.startswith(model_prefix("vllm", name) + "/")


def test_models_do_not_share_prefixes_by_accident():
    a = model_prefix("vllm", "m") + "/"
    b = model_prefix("vllm", "m2") + "/"
    assert not b.startswith(a)


@pytest.mark.parametrize(
    "path",
    [
        "vllm/m/1-0/0f/" + H + ".tmp",
        "vllm/m/1-0/aa/" + H + ".safetensors",
        "tf/m/1-0/0f/" + H + ".safetensors",
        "vllm/m/1-0/0f/.x.safetensors",
        "vllm/m%2/1-0/0f/" + H + ".safetensors",
        "vllm/a/b/1-0/0f/" + H + ".safetensors",
        "vllm/m/1-1/0f/" + H + ".safetensors",
        "readme.txt",
    ],
)
def test_foreign_paths_are_refused(path):
    with pytest.raises(ValueError):
        path_to_key(path)


def test_model_encoding_is_memoised_and_still_refuses_long_names():
    name = "meta-llama/Llama-3.1-8B-Instruct"
    first = encode_model(name)
    assert encode_model(name) is first  # the per-character loop ran once
    too_long = "\u4e00" * 1025  # 3 UTF-8 bytes each: 9225 encoded characters
    for _ in range(2):  # a refusal is not remembered as a value
        with pytest.raises(ValueError, match="path characters"):
            encode_model(too_long)


@pytest.mark.parametrize("root", ["/var/cache/lmcache", "/var/cache/lmcache/", "/"])
def test_disk_path_is_the_key_path_under_the_root(root: str) -> None:
    import os


    key = CacheEngineKey("vllm", "org/model", 2, 1, "ab" * 32)
    path = disk_path(root, key)
    assert path == os.path.join(root, *key_to_path(key).split("/"))
    assert "//" not in path


def test_temp_files_are_judged_by_host_pid_namespace_and_pid() -> None:
    """Two containers of one pod share a hostname, not their pids: a temp file named
    with the host alone and a pid absent here was taken for a dead writer's."""
    import os
    import time

    from lmcache_core import layout

    now = time.time()
    ours = os.path.basename(layout.temp_path("/store/x.safetensors"))
    assert layout.is_temp_name(ours) and not layout.is_chunk_name(ours)
    assert f".{layout.WRITER_ID}.{os.getpid()}." in ours
    assert not layout.is_stale_temp(ours, now, now)  # this process is alive
    dead = f".x.safetensors.{layout.WRITER_ID}.999999999.0{layout.TEMP_SUFFIX}"  # pid_max is below that
    assert layout.is_stale_temp(dead, now, now)
    host = layout.WRITER_ID.rsplit("-", 1)[0]
    other_namespace = f".x.safetensors.{host}-1.999999999.0{layout.TEMP_SUFFIX}"
    assert not layout.is_stale_temp(other_namespace, now, now)  # its pid cannot be checked here...
    assert layout.is_stale_temp(other_namespace, now - layout.STALE_TEMP_SECONDS - 1, now)  # ...its age can
    assert os.path.basename(layout.temp_path("/store/x.safetensors")) != ours  # unique per call


def test_a_temp_file_of_a_writer_killed_but_not_reaped_is_a_dead_writers() -> None:
    """Signal 0 reaches a zombie: a writer killed mid-put whose parent never reaps it (a
    container without an init) kept its temp file for an hour."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lmcache_core import layout

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = time.time()
        name = f".x.safetensors.{layout.WRITER_ID}.{child.pid}.0{layout.TEMP_SUFFIX}"
        assert not layout.is_stale_temp(name, now, now)  # running
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not layout.is_stale_temp(name, now, now) and time.monotonic() < deadline:
            time.sleep(0.01)  # the kernel makes it a zombie a moment after the signal
        os.kill(child.pid, 0)  # still there to signal: a zombie, not reaped yet
        assert layout.is_stale_temp(name, now, now)
    finally:
        child.kill()
        child.wait()
