"""Audit 4 of the disk tier (``LMCLocalDiskBackend``): regressions, on real files and processes.

* ``contains`` answered True from the index for chunks whose file another process
  (its eviction, a remove, ``lmcache evict``) or an operator had removed: a promised
  hit that every later get missed;
* a write refused for a disk quota (``EDQUOT``) was a bare ``OSError``, not the
  ``StoreFullError`` a full disk gives.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcache_core import LMCacheEngineConfig
from lmcache_core.errors import StoreFullError
from lmcache_core.layout import key_to_path
from lmcache_core.storage_backend import disk_io
from lmcache_core.storage_backend.local_backend import LMCLocalDiskBackend
from tests.conftest import make_key

GB = 1024**3
REPO = Path(__file__).resolve().parent.parent


def open_disk(root: Path, budget_bytes: int | None = None) -> LMCLocalDiskBackend:
    size = 1.0 if budget_bytes is None else budget_bytes / GB
    cfg = LMCacheEngineConfig.from_defaults(local_device=None, local_disk=str(root), max_local_disk_size=size)
    return LMCLocalDiskBackend(cfg, None, "cpu")


def chunk(seed: int, n: int = 4096) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def in_another_process(root: Path, body: str) -> None:
    """Run ``body`` in a fresh interpreter with ``store`` opened on ``root`` (closed after)."""
    code = (
        "from tests.test_disk_audit4 import open_disk, chunk\n"
        "from tests.conftest import make_key\n"
        f"store = open_disk({str(root)!r})\n"
        f"{body}\n"
        "store.close()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# -- contains after another process or an operator removed the file -----------------------------


def test_contains_is_false_once_another_process_removed_the_chunk(tmp_path):
    root = tmp_path / "store"
    store = open_disk(root)
    keys = [make_key(f"c{i}") for i in range(4)]
    for i, key in enumerate(keys):
        store.put(key, chunk(i))
    assert all(store.contains(k) for k in keys)
    # A real second process removes two of them (as its eviction or `lmcache evict` would).
    in_another_process(root, "for i in (0, 1): assert store.remove(make_key(f'c{i}'))")
    assert not store.contains(keys[0]) and not store.contains(keys[1]), "a removed chunk was promised"
    assert store.contains(keys[2]) and store.contains(keys[3])
    # The index forgot them: the budget no longer counts their bytes.
    assert store.used_bytes == sum((root / key_to_path(k)).stat().st_size for k in keys[2:])
    assert store.get(keys[2]) is not None and store.get(keys[0]) is None
    store.close()


def test_contains_after_the_directory_was_deleted_and_the_store_keeps_working(tmp_path):
    root = tmp_path / "store"
    store = open_disk(root)
    keys = [make_key(f"d{i}") for i in range(3)]
    for i, key in enumerate(keys):
        store.put(key, chunk(i))
    shutil.rmtree(root)
    assert [store.contains(k) for k in keys] == [False, False, False]
    assert store.used_bytes == 0
    # Writes recreate the directories; read-your-writes holds for queued puts too.
    store.put(keys[0], chunk(10))
    store.put(keys[1], chunk(11), blocking=False)
    assert store.contains(keys[1])
    assert torch.equal(store.get(keys[1]), chunk(11))
    assert torch.equal(store.get(keys[0]), chunk(10))
    store.close()


def test_contains_is_false_for_a_directory_at_a_chunk_path(tmp_path):
    root = tmp_path / "store"
    store = open_disk(root)
    key = make_key("dir")
    store.put(key, chunk(1))
    path = root / key_to_path(key)
    path.unlink()
    path.mkdir()  # something no get can serve
    assert store.get(key) is None
    assert not store.contains(key)
    store.close()


# -- a disk quota is a full store ------------------------------------------------------------------


@pytest.mark.parametrize("op", ["open", "write"])
def test_a_write_refused_for_a_disk_quota_is_a_store_full_error(tmp_path, op):
    root = tmp_path / "store"
    store = open_disk(root)
    store.put(make_key("keep"), chunk(1))
    with disk_io.fault_hook(disk_io.Fault(op, errno.EDQUOT)):
        with pytest.raises(StoreFullError) as info:
            store.put(make_key("q"), chunk(2))
        assert info.value.errno == errno.ENOSPC
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EDQUOT
        store.put(make_key("q-bg"), chunk(3), blocking=False)
        assert store.get(make_key("q-bg")) is None
    assert store.stats["background_put_failures"] == 1
    assert store.stats["put_failures"] == 2
    assert not [p for p in os.listdir(root / key_to_path(make_key("q")).rsplit("/", 1)[0]) if p.endswith(".tmp")]
    # Before giving up, the first put let go of the only other chunk to make room.
    assert store.get(make_key("keep")) is None and store.stats["full_disk_evictions"] == 1
    # The quota lifted: the store works again.
    store.put(make_key("q"), chunk(2))
    assert torch.equal(store.get(make_key("q")), chunk(2))
    store.close()


# -- a shard directory removed while a put runs ----------------------------------------------------


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "queued"])
def test_a_put_whose_directory_is_removed_before_its_temp_file_opens_still_lands(tmp_path, blocking):
    """An empty-directory cleanup (``find -empty -delete``) racing a put: the directory
    exists at ``makedirs`` and is gone at the open. Made real here: the fault hook, which
    runs just before the open, removes the directory (once) instead of failing."""
    root = tmp_path / "store"
    store = open_disk(root)
    key = make_key("race")
    shard = root / key_to_path(key).rsplit("/", 1)[0]
    removed: list[str] = []

    def remove_dir_once(op: str, path: str) -> None:
        if op == "open" and path.endswith(".tmp") and not removed:
            shutil.rmtree(os.path.dirname(path))
            removed.append(path)

    with disk_io.fault_hook(remove_dir_once):
        store.put(key, chunk(5), blocking=blocking)
        assert torch.equal(store.get(key), chunk(5))
    assert removed and removed[0].startswith(str(shard))
    assert store.stats["put_failures"] == 0 and store.stats["background_put_failures"] == 0
    store.close()
    again = open_disk(root)
    assert torch.equal(again.get(key), chunk(5))
    again.close()
