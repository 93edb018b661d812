"""Regressions from the seventh CLI audit (following README.md literally), each named
after the defect it reproduces.

A. ``show --format json`` printed ``Infinity`` (the mean of huge float64 values
   overflows), which is no JSON: jq and ``JSON.parse`` refuse the document.
B. ``show --format json`` of a chunk that failed its checksum exited 1 with nothing
   on stderr saying why.
C. ``lmcache config`` with a bad setting failed with "... (see `lmcache config`)":
   the command pointed at itself instead of at the setting to fix.
D. Progress: ``warm`` and ``put --tokens`` filled their bar by bytes moved, so a
   rerun that found every chunk in place ended on an empty bar ("0.0/6.7 MiB",
   "-:--:--"), and a fresh ``warm`` stopped short of its end (payload bytes against
   a total of stored sizes); ``evict``, ``ls -l`` and ``warm --dry-run``, a request
   per chunk, showed nothing however long they ran.
E. ``get -o chunk.npy`` wrote safetensors bytes under a ``.npy`` name, a file that
   ``lmcache put`` and numpy then refused.
F. README: the corruption example (``dd ... seek=300``) hit the chunk header, so
   ``verify`` said "bad header", not the "checksum mismatch" shown; the ``stats``
   example lacked the MODEL and FMT tables ``stats`` prints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lmcache_cli.main import app
from tests.test_cli import MODEL, key, tensor_file
from tests.test_cli_audit4 import on_terminal
from tests.test_cli_audit_fixes import lmcache

pytestmark = pytest.mark.usefixtures("private_cli_env")

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = tmp_path / "store"
    path.mkdir()
    return str(path)


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _chunk_path(store: str, chunk_key: str) -> Path:
    (path,) = Path(store).rglob(chunk_key.rsplit("@", 1)[1] + ".safetensors")
    return path


# -- A, B: show --format json ------------------------------------------------------------


def test_show_json_is_standard_json_when_the_mean_overflows(store: str, tmp_path: Path) -> None:
    huge = tmp_path / "huge.npy"
    np.save(huge, np.full((2, 2, 4, 1, 2), 1.5e308, dtype=np.float64))
    lmcache("--store", store, "put", key(1), str(huge))

    result = lmcache("--store", store, "show", key(1), "--format", "json", "--layers")

    report = _strict_json(result.stdout)  # raised on "Infinity" before the fix
    assert isinstance(report, dict)
    assert report["values"]["all"]["min"] == 1.5e308
    assert report["values"]["all"]["mean"] == 1.5e308  # summed scaled: no overflow


def test_every_json_document_is_standard_json(capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever a command reports, a number that is not finite is written as null."""
    from lmcache_cli.output import Output, OutputFormat

    Output(OutputFormat.json).data({"a": float("inf"), "b": [float("nan"), 1.5, (float("-inf"),)], "c": "x"})
    assert _strict_json(capsys.readouterr().out) == {"a": None, "b": [None, 1.5, [None]], "c": "x"}


def test_show_json_of_a_corrupt_chunk_says_why_on_stderr(store: str, tmp_path: Path) -> None:
    lmcache("--store", store, "put", key(2), str(tensor_file(tmp_path)))
    path = _chunk_path(store, key(2))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a payload byte: the header still reads
    path.write_bytes(bytes(data))

    result = lmcache("--store", store, "show", key(2), "--format", "json", code=1)

    assert _strict_json(result.stdout)["checksum_ok"] is False  # type: ignore[index]
    assert re.fullmatch(r"error: .*checksum mismatch.*\n", result.stderr), result.stderr


# -- C: lmcache config with a bad setting -----------------------------------------------------


def test_config_with_a_bad_variable_names_it_instead_of_itself() -> None:
    result = CliRunner().invoke(app, ["config"], env={"LMCACHE_CHUNK_SIZE": "abc"})

    assert result.exit_code == 1
    assert "see `lmcache config`" not in result.stderr, result.stderr
    assert "LMCACHE_CHUNK_SIZE" in result.stderr and "chunk_size" in result.stderr


def test_config_with_a_bad_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "lmcache.yaml"
    bad.write_text("remote_timeout: -1\n")

    result = lmcache("--config", str(bad), "config", code=1)

    assert "see `lmcache config`" not in result.stderr, result.stderr
    assert str(bad) in result.stderr and "LMCACHE_REMOTE_TIMEOUT" in result.stderr


# -- D: progress on a terminal ---------------------------------------------------------------


def _last_frame(output: str, description: str) -> str:
    """The last frame the bar drew (rich redraws it on one line, after ``\\r``)."""
    frames = [f for f in re.split(r"[\r\n]+", output) if f.lstrip().startswith(description + " ")]
    assert frames, f"no {description!r} progress bar in:\n{output}"
    return frames[-1]


def test_warm_rerun_that_skips_every_chunk_ends_on_a_full_bar(store: str, tmp_path: Path) -> None:
    for i in range(3):
        lmcache("--store", store, "put", key(i), str(tensor_file(tmp_path, seed=i)))
    dst = str(tmp_path / "dst")
    lmcache("warm", "--from", store, "--to", dst)

    code, output = on_terminal(["warm", "--from", store, "--to", dst])

    assert code == 0, output
    frame = _last_frame(output, "warm")
    assert "100%" in frame and "3/3 chunks" in frame, frame
    assert "copied 0, skipped 3" in output


def test_put_tokens_rerun_ends_on_a_full_bar(store: str, tmp_path: Path) -> None:
    tokens = tmp_path / "prompt.json"
    tokens.write_text(json.dumps(list(range(40))))
    kv = tensor_file(tmp_path, "kv.safetensors", shape=(2, 2, 40, 4, 8))
    args = ["--store", store, "put", "--tokens", str(tokens), "--kv", str(kv), "--model", MODEL, "--chunk-size", "16"]
    lmcache(*args)

    code, output = on_terminal(args)

    assert code == 0, output
    frame = _last_frame(output, "put")
    assert "100%" in frame and "3/3 chunks" in frame, frame


def test_evict_shows_progress_while_it_removes(store: str, tmp_path: Path) -> None:
    for i in range(3):
        lmcache("--store", store, "put", key(i), str(tensor_file(tmp_path, seed=i)))

    code, output = on_terminal(["--store", store, "evict", "*", "--yes"])

    assert code == 0, output
    frame = _last_frame(output, "evict")
    assert "100%" in frame and "3/3 chunks" in frame, frame
    assert "removed 3 chunks" in output
    assert lmcache("--store", store, "ls", "-q").stdout == ""


def test_ls_long_and_warm_dry_run_show_progress(store: str, tmp_path: Path) -> None:
    for i in range(2):
        lmcache("--store", store, "put", key(i), str(tensor_file(tmp_path, seed=i)))

    code, output = on_terminal(["--store", store, "ls", "-l"])
    assert code == 0, output
    assert "2/2 chunks" in _last_frame(output, "ls -l")

    code, output = on_terminal(["warm", "--from", store, "--to", str(tmp_path / "dst"), "--dry-run"])
    assert code == 0, output
    assert "2/2 chunks" in _last_frame(output, "warm --dry-run")
    assert "would copy 2 chunks" in output


# -- E: get -o with another tensor format's suffix ------------------------------------------------


@pytest.mark.parametrize("name", ["chunk.npy", "chunk.pt", "chunk.PTH"])
def test_get_refuses_an_output_name_of_another_tensor_format(store: str, tmp_path: Path, name: str) -> None:
    lmcache("--store", store, "put", key(3), str(tensor_file(tmp_path)))
    out = tmp_path / name

    result = lmcache("--store", store, "get", key(3), "-o", str(out), code=2)

    assert ".safetensors" in result.stderr
    assert not out.exists()


# -- F: README examples ----------------------------------------------------------------------


def test_readme_corruption_example_gives_the_checksum_mismatch_it_shows(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"\$ printf x \| dd of=\S*/(\w+)\.safetensors bs=1 seek=(\d+) conv=notrunc", text)
    assert m, "README's corruption example moved"
    chunk_hash, offset = m.group(1), int(m.group(2))
    assert "checksum mismatch  bad" in text[m.end() :]
    store = tmp_path / "store"
    store.mkdir()
    readme_key = f"vllm@meta-llama/Llama-3.1-8B@1@0@{chunk_hash}"
    # The README's chunk: bf16 (4, 2, 256, 8, 64), 2 MiB.
    lmcache("--store", str(store), "put", readme_key, str(tensor_file(tmp_path, shape=(4, 2, 256, 8, 64))))
    path = _chunk_path(str(store), readme_key)
    data = bytearray(path.read_bytes())
    data[offset] = ord("x") if data[offset] != ord("x") else ord("y")
    path.write_bytes(bytes(data))

    result = lmcache("--store", str(store), "verify", "--format", "json", code=1)

    (bad,) = json.loads(result.stdout)["bad"]
    assert bad["reason"] == "checksum mismatch", bad


def test_readme_stats_example_has_the_tables_stats_prints(store: str, tmp_path: Path) -> None:
    lmcache("--store", store, "put", key(4), str(tensor_file(tmp_path)))
    printed = lmcache("--store", store, "stats").stdout
    text = README.read_text(encoding="utf-8")
    example = text[text.index("$ lmcache stats\n") :].split("```", 1)[0]

    def titles(block: str) -> list[str]:
        return [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith("$")]

    printed_titles = [t for t in titles(printed) if t not in (MODEL, "vllm")]
    example_titles = [t for t in titles(example) if t not in ("meta-llama/Llama-3.1-8B", "vllm")]
    assert printed_titles == example_titles
