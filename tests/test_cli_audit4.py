"""Regressions from the fourth CLI audit, each named after the defect it reproduces.

A. On a terminal, table cells were rich markup: a key with "[" in its model name
   made ``ls``/``stats``/``verify`` fail with MarkupError, or printed another key.
B. ``ls -q --format json`` printed bare keys where a script expected JSON.
C. ``evict --format json`` had no ``failures`` field when it removed nothing.
D. An empty ``.npy`` was "unexpected EOFError"; a truncated or non-.npy file was
   reported as needing pickle.
E. ``put`` of a 0-d ``.npy`` stored shape (1,); a big-endian ``.npy`` was refused.
F. ``--model ''`` (an unset variable) silently selected nothing (warm "copied 0",
   exit 0); a model name no key can hold, or ``--worker-id`` >= ``--world-size``,
   exited 1 instead of 2 (usage).
G. ``warm --keys`` with a key listed twice copied it twice and counted two chunks.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import KEY, MODEL, tensor_file
from tests.test_cli_audit_fixes import lmcache

pytestmark = pytest.mark.usefixtures("private_cli_env")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = tmp_path / "store"
    path.mkdir()
    return str(path)


def on_terminal(args: list[str]) -> tuple[int, str]:
    """Run ``lmcache ARGS`` with stdout and stderr on a pseudo-terminal, as a person
    at a shell does; (exit code, output without colour codes)."""
    code, _, output = on_pty(args, pipe_stdout=False)
    return code, output


def on_pty(args: list[str], *, pipe_stdout: bool) -> tuple[int, str, str]:
    """Run ``lmcache ARGS`` with stderr (and stdout, unless ``pipe_stdout``: as in
    ``lmcache ... --format json | jq``) on a pseudo-terminal; (exit code, piped stdout,
    terminal output without colour codes)."""
    main, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.update(COLUMNS="200", LINES="50", TERM="xterm")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lmcache_cli.main import main; sys.argv[0] = 'lmcache'; main()", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe_stdout else child, stderr=child, env=env,
    )  # fmt: skip
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    stdout = proc.stdout.read().decode() if proc.stdout is not None else ""
    code = proc.wait(timeout=120)
    return code, stdout, _ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


# -- A: table cells on a terminal are text, never markup -----------------------------------


def test_tables_on_a_terminal_print_keys_with_brackets_verbatim(store: str, tmp_path: Path) -> None:
    chunk = str(tensor_file(tmp_path))
    closing, opening = "vllm@m[/x]@1@0@ab", "vllm@[bold]red@1@0@ac"
    lmcache("--store", store, "put", closing, chunk)
    lmcache("--store", store, "put", opening, chunk)

    code, text = on_terminal(["--store", store, "ls"])
    assert code == 0, text
    assert "MarkupError" not in text
    assert closing in text and opening in text  # "[bold]" is part of the key, not a style
    assert "2 chunks" in text

    code, text = on_terminal(["--store", store, "stats"])
    assert code == 0, text
    assert "m[/x]" in text and "[bold]red" in text

    code, text = on_terminal(["--store", store, "verify"])
    assert code == 0, text
    assert "checked 2 chunks" in text and "MarkupError" not in text


# -- B: --format json never prints bare keys ------------------------------------------------


def test_ls_keys_only_with_format_json_is_a_usage_error(store: str, tmp_path: Path) -> None:
    lmcache("--store", store, "put", KEY, str(tensor_file(tmp_path)))
    for args in (["--format", "json", "ls", "-q"], ["ls", "-q", "--format", "json"]):
        r = lmcache("--store", store, *args, code=2)
        assert r.stdout == "", "stdout must hold JSON or nothing in json mode"
        assert "-q" in r.stderr and "--format json" in r.stderr
    assert lmcache("--store", store, "ls", "-q").stdout == KEY + "\n"
    assert json.loads(lmcache("--store", store, "ls", "--format", "json").stdout)["count"] == 1


# -- C: evict's JSON has the same fields whatever it did ------------------------------------


def test_evict_json_fields_are_the_same_planned_or_done(store: str, tmp_path: Path) -> None:
    lmcache("--store", store, "put", KEY, str(tensor_file(tmp_path)))
    nothing = json.loads(lmcache("--store", store, "evict", "no-such-model", "--format", "json").stdout)
    planned = json.loads(lmcache("--store", store, "evict", "*", "--dry-run", "--format", "json").stdout)
    done = json.loads(lmcache("--store", store, "evict", "*", "--yes", "--format", "json").stdout)
    assert done["removed"] == 1 and planned["removed"] == 0 and nothing["plan"]["chunks"] == 0
    assert set(nothing) == set(planned) == set(done)
    assert nothing["failures"] == [] and planned["failures"] == [] and done["failures"] == []


# -- D: a bad .npy is one clear error ------------------------------------------------------


def test_put_and_lookup_of_empty_or_damaged_npy_say_what_is_wrong(store: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    text = tmp_path / "text.npy"
    text.write_text("token ids: 1 2 3\n")
    full = tmp_path / "full.npy"
    np.save(full, np.arange(1000, dtype=np.int64))
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(full.read_bytes()[:300])

    for path, says in ((empty, "is empty"), (text, "not a .npy file"), (truncated, "truncated")):
        for args in (["put", KEY, str(path)], ["lookup", "-t", str(path), "-m", MODEL]):
            r = lmcache("--store", store, *args, code=1)
            lines = r.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
            assert says in lines[0], lines[0]
            assert "unexpected" not in lines[0]
            # Neither file holds pickled objects: no hint at loading it unsafely.
            assert "pickle" not in lines[0] and "trust" not in lines[0], lines[0]
    assert not list(Path(store).rglob("*.safetensors"))


# -- E: a .npy is stored as the array it holds --------------------------------------------


def test_put_npy_keeps_a_scalar_shape_and_reads_big_endian(store: str, tmp_path: Path) -> None:
    scalar = tmp_path / "scalar.npy"
    np.save(scalar, np.array(7.5, dtype=np.float32))
    key0 = f"vllm@{MODEL}@1@0@a0"
    assert json.loads(lmcache("--store", store, "put", key0, str(scalar), "--format", "json").stdout)["shape"] == []
    out = tmp_path / "scalar.safetensors"
    lmcache("--store", store, "get", key0, "-o", str(out))
    back = load_file(str(out))["kv_chunk"]
    assert back.shape == () and back.item() == 7.5

    big = tmp_path / "big_endian.npy"
    values = np.arange(24, dtype=">f4").reshape(2, 3, 4)
    np.save(big, values)
    key1 = f"vllm@{MODEL}@1@0@a1"
    lmcache("--store", store, "put", key1, str(big))
    out = tmp_path / "big.safetensors"
    lmcache("--store", store, "get", key1, "-o", str(out))
    assert torch.equal(load_file(str(out))["kv_chunk"], torch.arange(24, dtype=torch.float32).reshape(2, 3, 4))


# -- F: --model, --world-size and --worker-id are checked as arguments ---------------------


def test_empty_model_is_a_usage_error_not_an_empty_selection(store: str, tmp_path: Path) -> None:
    lmcache("--store", store, "put", KEY, str(tensor_file(tmp_path)))
    dst = tmp_path / "dst"
    r = lmcache("--store", store, "warm", "--to", str(dst), "--model", "", code=2)
    assert "--model is empty" in r.stderr and "copied" not in r.stdout + r.stderr
    for args in (["ls", "--model", ""], ["evict", "--model", " ", "--yes"], ["ls", "-m", "", "--format", "json"]):
        r = lmcache("--store", store, *args, code=2)
        assert "--model is empty" in r.stderr and r.stdout == ""
    assert lmcache("--store", store, "ls", "-q").stdout == KEY + "\n"  # nothing evicted


def test_bad_key_fields_of_token_commands_are_usage_errors(store: str, tmp_path: Path) -> None:
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps(list(range(16))))
    kv = str(tensor_file(tmp_path, "kv.safetensors"))
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["lookup", "-t", str(tokens), "-m", "a@b"], "--model"),
        (["lookup", "-t", str(tokens), "-m", ""], "--model"),
        (["get", "--tokens", str(tokens), "-m", "bad\tname", "-o", out], "--model"),
        (["put", "--tokens", str(tokens), "--kv", kv, "-m", "a@b"], "--model"),
        (["lookup", "-t", str(tokens), "-m", MODEL, "--world-size", "2", "--worker-id", "5"], "--worker-id"),
        (["ls", "--model", "a@b"], "--model"),
    ]
    for args, option in cases:
        r = lmcache("--store", store, *args, code=2)
        assert r.stderr.startswith(f"error: {option}"), (args, r.stderr)
    assert not list(Path(store).rglob("*.safetensors"))


# -- G: warm --keys copies each listed chunk once ------------------------------------------


def test_warm_keys_listed_twice_are_copied_and_counted_once(store: str, tmp_path: Path) -> None:
    lmcache("--store", store, "put", KEY, str(tensor_file(tmp_path)))
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n{KEY}\n")
    dst = tmp_path / "dst"
    report = json.loads(
        lmcache("warm", "--keys", str(keys), "--from", store, "--to", str(dst), "--format", "json").stdout
    )
    assert report["copied"] == 1 and report["skipped"] == 0 and report["failed"] == 0
    assert report["bytes"] == 2 * 2 * 16 * 4 * 8 * 2  # one bf16 chunk, not two
    assert lmcache("--store", str(dst), "ls", "-q").stdout == KEY + "\n"
