"""Regressions of the tools' store operations (``lmcache_core.store_ops``), found by audit.

1. ``verify --fix`` removed by key whatever file was at the chunk path when the fix
   ran: a good copy that a serving process wrote (``os.replace``) after the check
   had judged the old one bad was deleted. Now the fix removes only the very file
   the check read (device, inode, size, mtime), as the disk tier's own quarantine
   does, and reports a replaced one as left alone.
2. ``Store.read`` (``lmcache show``) raised on a file whose header parses but is not
   an lmcache chunk (a plain safetensors file): ``show`` printed an error and no
   report, and ``--format json`` printed nothing. Now it is a failed check, shown
   like a chunk that fails its checksum.

Real files and the real CLI; no mocks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmcache_core import chunk_format
from lmcache_core.key import CacheEngineKey
from lmcache_core.store_ops import CORRUPT, Store, verify_store
from tests.test_cli import Cli, chunk_path, put_many
from tests.test_read_paths_leave_stores_alone import flip_payload_byte

# Every test: no LMCACHE_* variable of the caller, a private default store.
pytestmark = pytest.mark.usefixtures("private_cli_env")


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "store")




def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` at ``path`` as the disk tier does: a temp file, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.writer.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- 1. verify --fix removes only the file it checked ---------------------------------------


def test_regression_verify_fix_deleted_a_good_chunk_rewritten_after_its_check(
    cli: Cli, tmp_path: Path
) -> None:
    (k,) = put_many(cli, tmp_path, 1)
    path = chunk_path(cli.store, k)
    good = path.read_bytes()
    flip_payload_byte(path)
    rewrites: list[int] = []

    def serving_process_rewrites(done: int, nbytes: int) -> None:
        # Called once the chunk's check is done, before the fix: a writer puts a good copy.
        if not rewrites:
            rewrites.append(done)
            replace_atomically(path, good)

    with Store(str(cli.store)) as store:
        report = verify_store(store, fix=True, jobs=1, progress=serving_process_rewrites)
    assert rewrites, "the progress callback never ran"
    assert [b.where for b in report.bad] == [k]  # the copy checked was bad ...
    assert report.removed == []  # ... but it is not the one at the path now
    assert report.left_alone == [k]
    assert report.remaining_problems == 0
    assert report.to_dict()["left_alone"] == [k]
    assert path.read_bytes() == good  # the good copy survived
    cli("verify")  # and the store is sound


def test_regression_verify_fix_deleted_a_chunk_written_over_a_fifo_after_the_scan(
    cli: Cli, tmp_path: Path
) -> None:
    """A FIFO squatting a chunk path is judged from the scan; a chunk written there
    afterwards is not the FIFO, and stays."""
    k, other = put_many(cli, tmp_path, 2)
    path = chunk_path(cli.store, k)
    good = path.read_bytes()
    path.unlink()
    os.mkfifo(path)

    def serving_process_writes(done: int, nbytes: int) -> None:
        if path.is_fifo():
            replace_atomically(path, good)

    with Store(str(cli.store)) as store:
        report = verify_store(store, fix=True, jobs=1, progress=serving_process_writes)
    assert [b.where for b in report.bad] == [str(path)]
    assert report.removed == [] and report.left_alone == [str(path)]
    assert path.read_bytes() == good
    assert chunk_path(cli.store, other).exists()


def test_verify_fix_still_removes_a_bad_chunk_nobody_touched(cli: Cli, tmp_path: Path) -> None:
    """The identity check must match the file the check read (fstat then, lstat at the fix)."""
    keys = put_many(cli, tmp_path, 3)
    bad = chunk_path(cli.store, keys[1])
    flip_payload_byte(bad)
    fifo_key = keys[2]
    fifo = chunk_path(cli.store, fifo_key)
    fifo.unlink()
    os.mkfifo(fifo)
    res = cli.json("verify", "--fix")
    assert sorted(res["removed"]) == sorted([keys[1], str(fifo)])
    assert res["left_alone"] == [] and res["problems_left"] == 0
    assert not bad.exists() and not os.path.lexists(fifo)
    assert chunk_path(cli.store, keys[0]).exists()


# -- 2. show on a file that is not an lmcache chunk -------------------------------------------


def plant_foreign_safetensors(cli: Cli, tmp_path: Path) -> tuple[str, Path, torch.Tensor]:
    """A plain safetensors file (no lmcache metadata) at a chunk's path."""
    (k,) = put_many(cli, tmp_path, 1)
    path = chunk_path(cli.store, k)
    tensor = torch.arange(2 * 2 * 16 * 4 * 8, dtype=torch.float32).view(2, 2, 16, 4, 8).to(torch.bfloat16)
    path.unlink()
    save_file({chunk_format.TENSOR_NAME: tensor}, str(path))
    return k, path, tensor


def test_regression_store_read_raised_on_a_foreign_safetensors_file(cli: Cli, tmp_path: Path) -> None:
    k, path, tensor = plant_foreign_safetensors(cli, tmp_path)
    with Store(str(cli.store)) as store:
        chunk, check = store.read(CacheEngineKey.from_string(k))
    assert not check.ok and check.status == CORRUPT
    assert "not an lmcache chunk" in check.reason
    assert check.header is not None and check.header.version is None
    assert chunk is not None and torch.equal(chunk, tensor)  # shown like a chunk failing its checksum
    assert path.exists()  # inspection leaves it


def test_regression_show_printed_no_report_for_a_foreign_safetensors_file(cli: Cli, tmp_path: Path) -> None:
    k, path, _ = plant_foreign_safetensors(cli, tmp_path)
    text = cli("show", k, code=1)
    assert "FAILED: not an lmcache chunk" in text.stdout
    assert "not an lmcache chunk" in text.stderr
    doc = json.loads(cli("show", k, "--format", "json", code=1).stdout)
    assert doc["key"] == k and doc["checksum_ok"] is False
    assert doc["checksum_status"].startswith("FAILED: not an lmcache chunk")
    assert doc["values"] is not None
    assert path.exists()
