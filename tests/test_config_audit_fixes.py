"""Regressions from a config and URL audit: mistyped store URLs, secrets in odd places,
unbounded numbers, and the names a disk store gives its files.

Each test reproduces what the audit found with real objects (configs, the CLI through
Typer's CliRunner, disk stores in ``tmp_path``); no network.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from lmcache_cli.main import app
from lmcache_core import layout
from lmcache_core.config import (
    LMCacheEngineConfig,
    check_remote_url,
    mask_secrets_in,
    mask_url,
    store_kind,
)
from lmcache_core.errors import ConfigError
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend import open_backend

SECRET = "SEKRET"

# -- 1. a mistyped Redis URL never prints its password -------------------------------------------

MISTYPED = [
    f"redis:/admin:{SECRET}@cache:6379/0",  # one slash
    f"redis//admin:{SECRET}@cache:6379/0",  # no colon
    f"//admin:{SECRET}@cache:6379",  # no scheme
    f"redis:admin:{SECRET}@cache:6379",  # no slashes
    f"cache:6379/0?password={SECRET}",  # no scheme, the password in the query
]


@pytest.mark.parametrize("url", MISTYPED)
def test_mistyped_redis_urls_are_masked_everywhere(url: str) -> None:
    shown = mask_url(url)
    assert SECRET not in shown and "cache" in shown  # masked, the host still shown
    text = mask_secrets_in(f"error: cannot open {url}: refused")
    assert SECRET not in text and text.startswith("error: cannot open ") and text.endswith(": refused")
    for field in ("remote_url", "local_disk"):
        with pytest.raises(ConfigError) as info:
            LMCacheEngineConfig.from_env({f"LMCACHE_{field.upper()}": url})
        assert SECRET not in str(info.value) and "***" in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"x?token={SECRET} next", "x?token=*** next"),
        (f"?password={SECRET}", "?password=***"),
        ("why? mail a@b.com /data/u:x@y/store", "why? mail a@b.com /data/u:x@y/store"),  # unchanged
    ],
)
def test_every_word_with_a_query_has_its_secret_pairs_masked(text: str, masked: str) -> None:
    assert mask_secrets_in(text) == masked


@pytest.mark.usefixtures("private_cli_env")
@pytest.mark.parametrize("url", MISTYPED)
def test_the_cli_refuses_a_mistyped_store_url_without_echoing_its_password(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["--store", url, "ls"])
    assert result.exit_code != 0
    assert SECRET not in result.stdout + result.stderr, result.stderr
    assert "***" in result.stderr and "scheme://" in result.stderr
    assert os.listdir(tmp_path) == []


# -- 2. open_backend / store_kind refuse mistyped URLs instead of making directories ------------------


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("s3:/bucket/prefix", "s3://bucket/prefix"),
        (f"redis:/admin:{SECRET}@cache:6379/0", "redis://admin:***@cache:6379/0"),
        ("file:/abs/path", "file:///abs/dir"),
        ("cache:6379", "./cache:6379"),  # a directory really named so is given as ./cache:6379
        (f"redis//admin:{SECRET}@cache:6379/0", "scheme://"),
        (f"//admin:{SECRET}@cache:6379", "scheme://"),
        ("file://localhost/abs/path", "file:///abs/path"),  # not the relative localhost/abs/path
    ],
)
def test_open_backend_refuses_a_mistyped_url_and_creates_nothing(
    url: str, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for attempt in (lambda: open_backend(url), lambda: store_kind(url)):
        with pytest.raises(ConfigError) as info:
            attempt()
        message = str(info.value)
        assert SECRET not in message and hint in message, message
    assert os.listdir(tmp_path) == []  # was ./s3:/bucket/prefix, ./redis:/admin:SEKRET@...


def test_a_directory_named_like_a_url_is_given_as_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for spelled in ("./cache:6379", str(tmp_path / "cache:6379"), f"file://{tmp_path}/cache:6379"):
        assert store_kind(spelled) == "disk"
        open_backend(spelled).close()
    assert os.listdir(tmp_path) == ["cache:6379"]
    assert store_kind("relative/dir") == "disk" and store_kind("//data/store") == "disk"


# -- 3. an Azure connection string (and other secret names) is masked ---------------------------------

CONNSTR = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET}b64==;EndpointSuffix=core.windows.net"


@pytest.mark.parametrize("value", [CONNSTR, quote(CONNSTR, safe="")])
@pytest.mark.parametrize("name", ["connection_string", "conn_str", "opts"])  # "opts": its pairs are masked
def test_an_azure_connection_string_never_shows_its_account_key(name: str, value: str) -> None:
    url = f"az://container/prefix?{name}={value}"
    cfg = LMCacheEngineConfig(remote_url=url)
    shown = [repr(cfg), str(cfg.to_dict()), mask_url(url), mask_secrets_in(f"error: {url} failed")]
    for text in shown:
        assert SECRET not in text, text
        assert "az://container/prefix?" in text


@pytest.mark.parametrize("name", ["sig", "Signature", "X-Amz-Signature", "auth", "passphrase", "sas_token", "sas"])
def test_more_secret_query_names_are_masked(name: str) -> None:
    assert mask_url(f"s3://b/p?region=x&{name}={SECRET}") == f"s3://b/p?region=x&{name}=***"


# -- 4. whitespace does not get an s3://key:secret@ URL past the check; gs:// is checked too ----------------


@pytest.mark.parametrize(
    "url",
    [
        f" s3://AKIA:{SECRET}@bucket/p",
        f"\ts3://AKIA:{SECRET}@bucket/p",
        f"s3://AKIA:{SECRET}@bucket/p\n",
        f"s\t3://AKIA:{SECRET}@bucket/p",  # urlsplit drops a tab anywhere
    ],
)
def test_whitespace_does_not_let_s3_credentials_through(url: str) -> None:
    for attempt in (lambda: LMCacheEngineConfig(remote_url=url), lambda: check_remote_url(url)):
        with pytest.raises(ConfigError, match="takes no user:password") as info:
            attempt()
        assert SECRET not in str(info.value) and "AWS_ACCESS_KEY_ID" in str(info.value)


def test_a_remote_url_is_stored_without_surrounding_whitespace() -> None:
    assert LMCacheEngineConfig(remote_url=" redis://h:1/0 \n").remote_url == "redis://h:1/0"
    assert LMCacheEngineConfig(remote_url="  ").remote_url is None


@pytest.mark.parametrize("url", [f"gs://user:{SECRET}@bucket/p", f"gcs://{SECRET}@bucket", f" gs://k:{SECRET}@b"])
def test_a_gcs_url_with_credentials_is_refused_saying_where_they_go(url: str) -> None:
    from lmcache_core.storage_backend.connector.registry import connector_for

    for attempt in (lambda: LMCacheEngineConfig(remote_url=url), lambda: connector_for(url, timeout=1.0)):
        with pytest.raises(ConfigError, match="takes no user:password") as info:
            attempt()
        assert SECRET not in str(info.value) and "GOOGLE_APPLICATION_CREDENTIALS" in str(info.value)
    assert LMCacheEngineConfig(remote_url="gs://bucket/p").remote_url == "gs://bucket/p"


# -- 5. world_size and worker_id are bounded ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [f"vllm@m@{10**300}@0@ab", f"vllm@m@{2**31}@0@ab", f"vllm@m@{2**31 + 1}@{2**31}@ab", "vllm@m@1" + "0" * 5000 + "@0@ab"],
)
def test_a_huge_world_size_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="world_size"):
        CacheEngineKey.from_string(text)


def test_the_largest_world_size_round_trips_through_a_disk_store(tmp_path: Path) -> None:
    import torch

    with pytest.raises(ValueError, match="world_size"):
        CacheEngineKey("vllm", "m", 2**31, 0, "ab")
    key = CacheEngineKey("vllm", "m", 2**31 - 1, 2**31 - 2, "ab")
    assert CacheEngineKey.from_string(key.to_string()) == key
    assert layout.path_to_key(layout.key_to_path(key)) == key
    with open_backend(str(tmp_path)) as store:
        store.put(key, torch.ones(2, 2))
        assert torch.equal(store.get(key), torch.ones(2, 2))


# -- 6. scan_store with a root ending in a separator ---------------------------------------------------


@pytest.mark.parametrize("suffix", ["/", "//"])
def test_scan_store_finds_the_keys_under_a_root_ending_in_a_separator(suffix: str, tmp_path: Path) -> None:
    import torch

    key = CacheEngineKey("vllm", "m", 1, 0, "ab")
    with open_backend(str(tmp_path)) as store:
        store.put(key, torch.zeros(2, 2))
    expected = [(path, k) for path, _, k in layout.scan_store(str(tmp_path))]
    assert [k for _, k in expected] == [key]
    assert [(path, k) for path, _, k in layout.scan_store(str(tmp_path) + suffix)] == expected


# -- 7. local_disk="file://" names no directory --------------------------------------------------------


def test_an_empty_file_url_is_refused_for_the_disk_tier_at_config_time() -> None:
    for field in ("local_disk", "local_device"):
        with pytest.raises(ConfigError) as info:
            LMCacheEngineConfig.from_defaults(**{field: "file://"})
        assert info.value.field == field
    with pytest.raises(ConfigError, match="names no directory"):
        open_backend("file://")


# -- 8. huge size budgets are refused at config time ------------------------------------------------------


@pytest.mark.parametrize("field", ["MAX_LOCAL_CACHE_SIZE", "MAX_LOCAL_DISK_SIZE"])
@pytest.mark.parametrize("value", ["1e300", "1.7e308", "inf", "nan", "-1"])
def test_a_huge_size_budget_is_a_config_error(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_env({f"LMCACHE_{field}": value})
    assert info.value.field == field.lower()


def test_a_huge_memory_budget_fails_when_the_store_opens_as_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at most"):
        open_backend("cpu://", max_local_cache_size=1e300)
    cfg = LMCacheEngineConfig(max_local_cache_size=1e9, max_local_disk_size=1e9)  # "unlimited", as tools use it
    assert cfg.memory_budget_bytes == cfg.disk_budget_bytes == int(1e9) * 1024**3


# -- 9. an '@' in a query value is not the end of a password ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://cache:6379/0?client_name=svc@prod", "redis://cache:6379/0?client_name=svc@prod"),
        ("redis://cache/0?client_name=svc@prod", "redis://cache/0?client_name=svc@prod"),
        (f"redis://u:{SECRET}@cache:6379/0?client_name=svc@prod", "redis://u:***@cache:6379/0?client_name=svc@prod"),
        # Still masked as mistyped passwords (a '/', '?' or '#' in them):
        (f"redis://user:pa/{SECRET}@host:6379/0", "redis://user:***@host:6379/0"),
        (f"redis://user:pa?x={SECRET}@host:6379/0", "redis://user:***@host:6379/0"),
        (f"redis://user:pa#{SECRET}@host:6379/0", "redis://user:***@host:6379/0"),
    ],
)
def test_an_at_sign_in_a_query_value_keeps_the_real_host(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert LMCacheEngineConfig(remote_url=url).to_dict()["remote_url"] == shown
    assert mask_secrets_in(f"open {url}: refused") == f"open {shown}: refused"


# -- 10. temp-file writer ids differ between hosts of one hostname -------------------------------------


def test_the_temp_file_writer_id_names_the_host_boot() -> None:
    import time

    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip().replace("-", "")[:8]
    except OSError:
        pytest.skip("no /proc/sys/kernel/random/boot_id here")
    assert f"-{boot}-" in layout.WRITER_ID and "." not in layout.WRITER_ID
    # Another host of the same hostname, in its initial PID namespace (the same inode
    # everywhere): its pid cannot be tested here, so its fresh temp file is left alone.
    other_host = layout.WRITER_ID.replace(f"-{boot}-", "-00000000-")
    name = f".x.safetensors.{other_host}.999999999.0{layout.TEMP_SUFFIX}"
    now = time.time()
    assert not layout.is_stale_temp(name, now, now)
    assert layout.is_stale_temp(name, now - layout.STALE_TEMP_SECONDS - 1, now)


@pytest.mark.parametrize(
    "text",
    [
        "?a=" + "http://u:pw@h?b=" * 3000,  # URLs nested in query values: recursed once per level
        "?q=" + "=".join(["password"] * 20000),  # pairs nested in values: recursed once per '='
        "?" + "a:" * 30000 + "u:pw@h",  # one long word: a regex tried at every position (8 s)
        "x " + "a/" * 30000 + "u:pw@h",
    ],
    ids=["nested-urls", "nested-pairs", "long-word", "many-segments"],
)
def test_masking_pathological_text_ends_and_shows_no_password(text: str) -> None:
    """Masking runs on every error line: it must end (no RecursionError, no quadratic
    scan) whatever the text, and still show no password."""
    from lmcache_core.config import mask_secrets_in, mask_url

    for mask in (mask_secrets_in, mask_url):
        out = mask(text)
        assert ":pw@" not in out


def test_an_upper_case_file_scheme_is_refused_not_made_a_relative_directory() -> None:
    from lmcache_core.config import ConfigError, store_kind

    assert store_kind("file:///tmp/x") == "disk"
    with pytest.raises(ConfigError, match="lower case"):
        store_kind("FILE:///tmp/x")
