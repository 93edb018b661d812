"""Regressions from a secret-masking audit: credentials in store URLs never reach any output.

Found by the audit, each reproduced through the real CLI (Typer's CliRunner):

* an ``s3://AKIA:secret@bucket`` URL reached botocore as the bucket name, and its
  error quoted ``"AKIA:secret@bucket"`` without the ``s3://`` the CLI's mask looked
  for: printed in clear by ``ls``/``put``/``get``/``warm``, and by ``bench`` in its
  human error and in ``--format json``'s ``errors[].error`` (bench masked no
  exception text at all). Such URLs are now refused, saying where S3 credentials go;
* ``?endpoint_url=http://u:pw@host&secret=...`` was taken for a mistyped password and
  its query secrets were printed (``config`` and every error);
* masking mangled the text around a URL: the hint ``redis://[user:pw@]host:port/db``
  became ``<unparseable url>`` and the ``:`` after ``secret=...`` was eaten.

No network: endpoints are a closed local port (127.0.0.1:1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lmcache_cli.main import app

pytestmark = pytest.mark.usefixtures("private_cli_env")

SECRET = "supersecret"
ENDPOINT = "endpoint_url=http://127.0.0.1:1"
S3_USERINFO_URL = f"s3://AKIA:{SECRET}@bucket/p?{ENDPOINT}"
KEY = "vllm@m@1@0@" + "ab" * 32
BENCH_ARGS = ["--kv-shape", "2,2,16,4,8", "--count", "2", "--batch", "2"]


def run(*args: str, code: int | None = 1) -> Any:
    result = CliRunner().invoke(app, list(args))
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def all_output(result: Any) -> str:
    return result.stdout + result.stderr


def error_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def tensor_file(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"kv": torch.zeros(2, 2, 4, 2, 8)}, str(path))
    return path


# -- 1. s3:// userinfo: refused, masked, and the message says where credentials go --------------


def _commands(tmp_path: Path, url: str) -> list[list[str]]:
    return [
        ["--store", url, "ls"],
        ["--store", url, "put", KEY, str(tensor_file(tmp_path))],
        ["--store", url, "get", KEY, "-o", str(tmp_path / "out.safetensors")],
        ["warm", "--from", url, "--to", str(tmp_path / "dst")],
        ["warm", "--from", str(tmp_path / "src"), "--to", url],
        ["--store", url, "bench", *BENCH_ARGS],
        ["bench", "-s", url, *BENCH_ARGS],
    ]


@pytest.mark.parametrize(
    "url, pieces",
    [
        (S3_USERINFO_URL, [SECRET]),
        # An AWS secret with a '/' in it: the bucket would have ended at the '/'.
        (f"s3://AKIA:super/{SECRET}@bucket/p?{ENDPOINT}", ["super/", SECRET]),
        (f"s3a://AKIA:{SECRET}@bucket/p?{ENDPOINT}", [SECRET]),
    ],
)
def test_s3_url_with_userinfo_is_refused_by_every_command_without_echoing_it(
    tmp_path: Path, url: str, pieces: list[str]
) -> None:
    (tmp_path / "src").mkdir()
    for argv in _commands(tmp_path, url):
        result = run(*argv)
        text = all_output(result)
        for piece in pieces:
            assert piece not in text, (argv, text)
        lines = error_lines(result)
        assert len(lines) == 1, (argv, result.stderr)  # one line: no multi-line botocore text
        assert "AKIA:***@bucket" in lines[0], (argv, lines)
        assert "takes no user:password" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0], (argv, lines)
        assert "Invalid bucket name" not in text  # never sent to S3 as a bucket


def test_bench_json_reports_the_refusal_masked(tmp_path: Path) -> None:
    result = run("bench", "-s", S3_USERINFO_URL, *BENCH_ARGS, "--format", "json")
    assert SECRET not in all_output(result)
    report = json.loads(result.stdout)
    assert report["rows"] == []
    (error,) = report["errors"]
    assert error["store"] == f"s3://AKIA:***@bucket/p?{ENDPOINT}"
    assert "\n" not in error["error"]
    assert error["error"].startswith("ConfigError: remote_url: s3://AKIA:***@bucket/p")
    assert "AWS_ACCESS_KEY_ID" in error["error"]


# -- bench masks every exception text it records ---------------------------------------------------


def test_bench_records_exception_texts_masked_and_on_one_line() -> None:
    """Whatever a store raises, quoting a credential in any form, the report holds it masked."""
    from lmcache_core.bench import BenchTarget, run_bench

    def broken(meta: Any, n: int) -> Any:
        raise ValueError(
            f'Parameter validation failed:\nInvalid bucket name "AKIA:{SECRET}@bucket": must match\n'
            f"  tried s3://bucket/p?secret={SECRET}: list: failed"
        )

    target = BenchTarget(f"redis://:{SECRET}@127.0.0.1:1/0", broken, "memory", raw_url="cpu://")
    report = run_bench([target], kv_shape=(2, 2, 4, 2, 8), count=2, batch=1)
    (error,) = report.errors
    assert SECRET not in json.dumps(report.to_dict())
    assert error["store"] == "redis://:***@127.0.0.1:1/0"
    assert error["error"] == (
        'ValueError: Parameter validation failed: Invalid bucket name "AKIA:***@bucket": must match '
        "tried s3://bucket/p?secret=***: list: failed"
    )


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_bench_of_a_mistyped_redis_url_quotes_no_part_of_the_password(fmt: str) -> None:
    """bench's raw redis-py client said "Port could not be cast to integer value as 'pa'"."""
    url = "redis://user:pa/s3cr3t@127.0.0.1:1/0"
    result = run("bench", "-s", url, *BENCH_ARGS, "--format", fmt)
    text = all_output(result)
    assert "s3cr3t" not in text and "'pa'" not in text, text
    (line,) = error_lines(result)
    assert "bench of redis://user:***@127.0.0.1:1/0 failed" in line
    assert "not a valid Redis URL: redis://user:***@127.0.0.1:1/0: expected redis://[user:pw@]host:port/db" in line
    if fmt == "json":
        (error,) = json.loads(result.stdout)["errors"]
        assert "'pa'" not in error["error"] and "s3cr3t" not in error["error"]


# -- 2. a URL as a query value, and every secret query value --------------------------------------

NESTED_URL = "s3://bucket/p?endpoint_url=http://u:pw1234@127.0.0.1:1&key=AKIAKEYID&secret=topsecret"
NESTED_MASKED = "s3://bucket/p?endpoint_url=http://u:***@127.0.0.1:1&key=***&secret=***"
NESTED_SECRETS = ("pw1234", "AKIAKEYID", "topsecret")


def test_config_masks_a_nested_url_and_the_query_secrets() -> None:
    human = run("--store", NESTED_URL, "config", code=0)
    assert NESTED_MASKED in human.stdout
    data = run("--store", NESTED_URL, "config", "--format", "json", code=0)
    for result in (human, data):
        for secret in NESTED_SECRETS:
            assert secret not in all_output(result), all_output(result)
    assert NESTED_MASKED in data.stdout


def test_errors_mask_a_nested_url_and_keep_the_separator_after_it() -> None:
    result = run("--store", NESTED_URL, "ls")
    for secret in NESTED_SECRETS:
        assert secret not in all_output(result)
    (line,) = error_lines(result)
    # "...&secret=***: list: HTTPClientError(...)": the ':' after the URL is the message's.
    assert line.startswith(f"error: store unavailable: {NESTED_MASKED}: list: ")
    assert line.endswith("; check the URL and that the server is up")


# -- 3. masking keeps the text around a URL ----------------------------------------------------------


def test_a_usage_template_in_an_error_survives_masking() -> None:
    result = run("--store", "redis://:hunter2@localhost:notaport/0", "ls")
    assert "hunter2" not in all_output(result)
    assert result.stderr.strip() == (
        "error: not a valid Redis URL: redis://:***@localhost:notaport/0: expected redis://[user:pw@]host:port/db"
    )


def test_a_bad_key_with_a_colon_is_echoed_as_typed(tmp_path: Path) -> None:
    """Keys are ``fmt@model@...``: their '@' and a model name's ':' are not credentials."""
    (tmp_path / "s").mkdir()
    result = run("--store", str(tmp_path / "s"), "show", "vllm@m:x@1@0", code=None)
    assert result.exit_code != 0
    assert "'vllm@m:x@1@0'" in result.stderr and "***" not in result.stderr


# -- the CLI's mask is the core's ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, masked",
    [
        (  # botocore quotes the bucket without its scheme
            'list: ParamValidationError(\'...\\nInvalid bucket name "AKIA:supersecret@bucket": Bucket\')',
            'list: ParamValidationError(\'...\\nInvalid bucket name "AKIA:***@bucket": Bucket\')',
        ),
        (f"{NESTED_URL}: list: X", f"{NESTED_MASKED}: list: X"),
        ("see (redis://h:1/0?token=abc). Then", "see (redis://h:1/0?token=***). Then"),
        ("[s3://b/p?secret=abc], next", "[s3://b/p?secret=***], next"),
        (
            "not a valid Redis URL: redis://:pw@h:x/0: expected redis://[user:pw@]host:port/db",
            "not a valid Redis URL: redis://:***@h:x/0: expected redis://[user:pw@]host:port/db",
        ),
        ("redis://[admin:hunter2@]h:1", "redis://[admin:***@]h:1"),  # not a placeholder: masked
        # Not credentials: keys (a model name may hold ':'), usage text, prose, paths.
        ("stored vllm@llama3:8b@1@0@abcdef, next", "stored vllm@llama3:8b@1@0@abcdef, next"),
        ("expected (fmt@model@world_size@worker_id@hash)", "expected (fmt@model@world_size@worker_id@hash)"),
        ("stops at chunk 1 (vllm@qwen2:7b@1@0@eeced1ab): bad", "stops at chunk 1 (vllm@qwen2:7b@1@0@eeced1ab): bad"),
        ('key "vllm@qwen2:7b@1@0@ab" and (AKIA:sec@bucket)', 'key "vllm@qwen2:7b@1@0@ab" and (AKIA:***@bucket)'),
        ("why? mail a@b.com /data/u:x@y/store file:///x cpu://", "why? mail a@b.com /data/u:x@y/store file:///x cpu://"),
    ],
)
def test_cli_mask_secrets_masks_credentials_and_keeps_the_rest(text: str, masked: str) -> None:
    from lmcache_cli.output import mask_secrets
    from lmcache_core.config import mask_secrets_in

    assert mask_secrets(text) == masked
    assert mask_secrets_in(text) == masked  # one implementation


def test_output_error_and_warning_are_one_masked_line(capsys: pytest.CaptureFixture[str]) -> None:
    from lmcache_cli.output import Output

    out = Output()
    out.error(f'bench failed: Invalid bucket name\n  "AKIA:{SECRET}@bucket"')
    out.warn(f"retrying\ns3://b/p?secret={SECRET}")
    out.message(f"progress on redis://:{SECRET}@h:1/0")
    err = capsys.readouterr().err
    assert SECRET not in err
    assert err.splitlines() == [
        'error: bench failed: Invalid bucket name "AKIA:***@bucket"',
        "warning: retrying s3://b/p?secret=***",
        "progress on redis://:***@h:1/0",
    ]


def test_warm_failure_reasons_mask_credentials_without_a_scheme() -> None:
    """warm's per-chunk reasons go through store_ops.mask_urls_in: one masking, the core's."""
    from lmcache_core.store_ops import mask_urls_in

    text = mask_urls_in('ParamValidationError: Invalid bucket name "AKIA:supersecret@bucket"; redis://:pw@h:1/0: list')
    assert "supersecret" not in text and ":pw@" not in text
    assert 'Invalid bucket name "AKIA:***@bucket"' in text and text.endswith("redis://:***@h:1/0: list")
