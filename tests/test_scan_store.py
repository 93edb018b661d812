"""Directory scans decode a model directory once; siblings must still be canonical chunk paths."""

from __future__ import annotations

import os

import torch

from lmcache_core import layout
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.local_backend import save_disk, scan_store


def test_siblings_share_the_decoded_directory_but_bad_names_are_skipped(tmp_path):
    root = str(tmp_path)
    keys = [CacheEngineKey("vllm", "org/model", 2, 1, "ab" + f"{i:062x}") for i in range(5)]
    for k in keys:
        path = os.path.join(root, *layout.key_to_path(k).split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_disk(path, torch.zeros(4), k.to_string())
    d = os.path.dirname(os.path.join(root, *layout.key_to_path(keys[0]).split("/")))
    for bad in ("AB" + "0" * 62 + ".safetensors", "cd" + "0" * 62 + ".safetensors", "ab.x.safetensors"):
        open(os.path.join(d, bad), "wb").close()
    found = {key for _, _, key in scan_store(root) if key is not None}
    assert found == set(keys)
    assert sum(1 for _, _, key in scan_store(root) if key is None) == 3
