"""Credentials never leave the config through an error message, a repr or a str.

A password may sit in ``remote_url`` (``redis://:pw@host``), in a value given to the
wrong field, in a schemeless ``user:pw@host`` typed without ``redis://``, in a YAML
line quoted back by a parse error, or in a mapping written where a URL belongs.
Every message ``lmcache_core.config`` produces masks the userinfo (``mask_url``),
and the config's repr shows the URL masked while equality still sees the real one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from lmcache_core.config import LMCacheEngineConfig, LMCacheEngineMetadata, mask_secrets_in, mask_url
from lmcache_core.errors import ConfigError

SECRET = "hunter2"


@pytest.mark.parametrize(
    "url, masked",
    [
        ("admin:hunter2@h:6379", "admin:***@h:6379"),
        (":hunter2@h:6379/0", ":***@h:6379/0"),
        ("hunter2@h", "***@h"),
        ("u:p@ss:hunter2@h:1/x@y", "u:***@h:1/x@y"),  # the last '@' of the authority ends userinfo
        ("/data/user@host/cache", "/data/user@host/cache"),  # a path: no authority, nothing to mask
        ("h:6379", "h:6379"),
    ],
)
def test_mask_url_masks_userinfo_without_a_scheme(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_schemeless_remote_url_from_env_is_masked_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        LMCacheEngineConfig.from_env({"LMCACHE_REMOTE_URL": "admin:hunter2@h:6379"})
    message = str(info.value)
    assert SECRET not in message
    assert message.startswith("remote_url:") and "admin:***@h:6379" in message
    assert info.value.field == "remote_url"


@pytest.mark.parametrize(
    "field, value",
    [
        ("remote_url", "admin:hunter2@h:6379"),
        ("remote_url", ":hunter2@h:6379/0"),
        ("remote_url", "hunter2@h"),
        ("remote_url", {"host": "h", "password": SECRET}),
        ("remote_url", ["redis://:hunter2@h"]),
        ("local_device", "redis://u:hunter2@h"),
        ("local_device", "u:hunter2@h"),
        ("local_disk", "s3://u:hunter2@bucket/p"),
        ("chunk_size", "u:hunter2@h"),
        ("max_local_cache_size", "redis://:hunter2@h"),
        ("max_local_disk_size", "u:hunter2@h"),
        ("remote_timeout", "u:hunter2@h"),
        ("pipelined_backend", "redis://:hunter2@h"),
        ("prefetch", "s3://b/p?secret=hunter2"),
        ("remote_serde", "u:hunter2@h"),
        ("remote_serde", "redis://:hunter2@h"),
    ],
)
def test_no_field_error_echoes_a_credential(field: str, value: Any, tmp_path: Path) -> None:
    import yaml

    attempts = [lambda: LMCacheEngineConfig.from_defaults(**{field: value})]
    if isinstance(value, str):
        attempts.append(lambda: LMCacheEngineConfig.from_env({f"LMCACHE_{field.upper()}": value}))
    conf = tmp_path / "lmcache.yaml"
    conf.write_text(yaml.safe_dump({field: value}))
    attempts.append(lambda: LMCacheEngineConfig.from_file(conf))
    for attempt in attempts:
        with pytest.raises(ConfigError) as info:
            attempt()
        assert SECRET not in str(info.value), str(info.value)
        assert SECRET not in repr(info.value)
        assert info.value.field == field
        assert "***" in str(info.value)  # the value is still shown, masked


@pytest.mark.parametrize(
    "text",
    [
        "remote_url: admin:hunter2@h:6379: x\n",  # the parse error quotes this line
        "remote_url: [redis://:hunter2@h\n",
        "chunk_size: 256\nremote_url: 'redis://:hunter2@h\n",
    ],
)
def test_yaml_errors_quoting_the_file_mask_credentials(text: str, tmp_path: Path) -> None:
    conf = tmp_path / "lmcache.yaml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        LMCacheEngineConfig.from_file(conf)
    assert SECRET not in str(info.value)


def test_unknown_field_named_like_a_url_is_masked(tmp_path: Path) -> None:
    conf = tmp_path / "lmcache.yaml"
    conf.write_text("redis://:hunter2@h: 1\n")
    with pytest.raises(ConfigError, match="unknown field") as info:
        LMCacheEngineConfig.from_file(conf)
    assert SECRET not in str(info.value)


def test_metadata_errors_mask_credentials() -> None:
    with pytest.raises(ConfigError, match="fmt") as info:
        LMCacheEngineMetadata(model_name="m", fmt="u:hunter2@h")
    assert SECRET not in str(info.value)


def test_mask_secrets_in_masks_every_url_like_word_and_nothing_else() -> None:
    text = "a [redis://:hunter2@h:1/0] b admin:hunter2@h c s3://b/p?token=hunter2 file:///x cpu:// why?"
    out = mask_secrets_in(text)
    assert SECRET not in out
    assert out.endswith("file:///x cpu:// why?")
    assert "[redis://:***@h:1/0]" in out and "admin:***@h" in out


# -- repr and str ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:hunter2@h:6380/1", "rediss://user:***@h:6380/1"),
        ("s3://bucket/prefix?secret=hunter2&region=x", "s3://bucket/prefix?secret=***&region=x"),
    ],
)
def test_config_repr_and_str_mask_the_remote_url(url: str, shown: str) -> None:
    cfg = LMCacheEngineConfig(remote_url=url)
    for text in (repr(cfg), str(cfg), f"{cfg}", repr([cfg]), repr({"cfg": cfg})):
        assert SECRET not in text
        assert f"remote_url={shown!r}" in text
    assert cfg.remote_url == url  # the value itself is untouched
    assert cfg.to_dict(mask_secrets=False)["remote_url"] == url


def test_config_repr_keeps_the_dataclass_form() -> None:
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=64, local_disk="/tmp/d", remote_url="redis://h:1/0")
    fields = [f for f in dataclasses.fields(cfg) if f.name != "sources"]
    expected = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in fields)
    assert repr(cfg) == f"LMCacheEngineConfig({expected})"  # nothing to mask: exactly the usual repr


def test_masking_repr_keeps_equality_and_replace() -> None:
    a = LMCacheEngineConfig(remote_url="redis://:hunter2@h:6379/0")
    b = LMCacheEngineConfig(remote_url="redis://:hunter2@h:6379/0")
    c = LMCacheEngineConfig(remote_url="redis://:other@h:6379/0")
    assert a == b and a != c  # equality still compares the real URL
    assert repr(a) == repr(c)  # ... while both print the same masked text
    d = a.replace(chunk_size=32)
    assert d.remote_url == a.remote_url and d.chunk_size == 32 and SECRET not in repr(d)
    e = dataclasses.replace(a, chunk_size=32)
    assert e == d and SECRET not in repr(e)


def test_remote_backend_repr_and_errors_hide_the_password(redis_server_factory: Any) -> None:
    """A password-protected redis-server: the backend works and never prints the password."""
    from lmcache_core.storage_backend.remote_backend import LMCPipelinedRemoteBackend, LMCRemoteBackend
    from tests.conftest import make_key
    from tests.test_conformance import chunk, same

    server = redis_server_factory("--requirepass", SECRET)
    url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
    cfg = LMCacheEngineConfig(local_device=None, remote_url=url, remote_timeout=5.0)
    for cls in (LMCRemoteBackend, LMCPipelinedRemoteBackend):
        backend = cls(cfg, None, "cpu")
        try:
            backend.put(make_key(1), chunk(1))
            assert same(backend.get(make_key(1)), chunk(1))
            for text in (repr(backend), str(backend), backend.describe(), repr(backend.config), repr(backend.connector)):
                assert SECRET not in text, text
            assert f"127.0.0.1:{server.port}" in repr(backend)
        finally:
            backend.close()


def test_bench_target_and_cli_state_reprs_hide_credentials() -> None:
    from lmcache_cli.state import CliState
    from lmcache_core.bench import BenchTarget

    url = "redis://:hunter2@127.0.0.1:6379/0"
    target = BenchTarget(url, lambda meta, n: None, "redis", raw_url=url,  # type: ignore[arg-type,return-value]
                         raw_options={"secret": "hunter2"})
    state = CliState(store_option=url)
    for text in (repr(target), str(target), repr(state)):
        assert "hunter2" not in text and "127.0.0.1:6379" in text


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        # Mistyped: an unencoded '/', '#' or '?' in the password. urlsplit takes part
        # of it for the path, fragment or query; found by review, printed as is.
        ("redis://user:pa/s3cr3t@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:pa#s3cr3t@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:pa?s3cr3t@host:6379/0?password=x", "redis://user:***@host:6379/0?password=***"),
        ("redis+cluster://u:pa/ss@h1:1,h2:2", "redis+cluster://u:***@h1:1,h2:2"),
        ("az://c/p?sv=1&sig=abc", "az://c/p?sv=1&sig=***"),  # an Azure SAS signature
        ("s3://b/p?pw=zz", "s3://b/p?pw=***"),
        ("unix:///tmp/r.sock?db=1", "unix:///tmp/r.sock?db=1"),  # was shown as unix:/tmp/...
    ],
)
def test_mask_url_with_delimiters_in_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cr3t" not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    ["redis://user:pa/s3cr3t@host:6379/0", "redis+cluster://u:pa/s3cr3t@h1:1,h2:2"],
)
def test_a_mistyped_redis_url_error_quotes_no_part_of_the_password(url: str) -> None:
    from lmcache_core.storage_backend.connector.redis_connector import RedisConnector

    with pytest.raises(ValueError) as info:
        RedisConnector(url, timeout=1.0)
    assert "s3cr3t" not in str(info.value) and "'pa'" not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize("path", ["/notadb", "/1/5", "/-1", "/db0"])
def test_a_redis_database_path_that_is_not_a_number_is_refused(path: str) -> None:
    """redis-py quietly read /notadb as db 0 and /1/5 as db 15: data in the wrong database."""
    from lmcache_core.storage_backend.connector.redis_connector import RedisConnector

    with pytest.raises(ValueError, match="database"):
        RedisConnector(f"redis://127.0.0.1:6379{path}", timeout=1.0)
    for fine in ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/7"):
        RedisConnector(fine, timeout=1.0).close()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("CHUNK_SIZE", "+-5", "expected an integer"),
        ("CHUNK_SIZE", "\u00b2", "expected an integer"),  # isdigit() is true for superscripts
        ("REMOTE_TIMEOUT", "1e308", "at most"),  # overflowed later, in a connector
    ],
)
def test_bad_numbers_are_config_errors_naming_the_field(field: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        LMCacheEngineConfig.from_env({f"LMCACHE_{field}": value})
    assert field.lower() in str(info.value)


# -- from a masking audit: nested URLs, every secret pair, templates, S3 userinfo -----------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        # A URL given as a query value is not a mistyped password: its userinfo and the
        # query's secrets are masked, the rest kept (was "http:***@...&secret=topsecret").
        (
            "s3://bucket/p?endpoint_url=http://u:hunter2@127.0.0.1:1&key=AKIA&secret=hunter2",
            "s3://bucket/p?endpoint_url=http://u:***@127.0.0.1:1&key=***&secret=***",
        ),
        (
            "redis://u:hunter2@h:1/0?x=http://a:hunter2@c&password=hunter2",
            "redis://u:***@h:1/0?x=http://a:***@c&password=***",
        ),
        ("redis://u:pa/hunter2@h/0?x=http://a:hunter2@c", "redis://u:***@h/0?x=http://a:***@c"),
        ("s3://b/p?endpoint_url=http%3A%2F%2Fu%3Ahunter2%40h", "s3://b/p?endpoint_url=http://u:***@h"),
        ("s3://b/p?secr%65t=hunter2", "s3://b/p?secr%65t=***"),  # a percent-encoded name
        # Unbalanced '[' (urlsplit refuses it): was "<unparseable url>", now the rest stays.
        ("redis://u:hun[ter2@host:1/0?db=1", "redis://u:***@host:1/0?db=1"),
        # Usage templates: a placeholder password stays, a real one does not.
        ("redis://[user:pw@]host:port/db", "redis://[user:pw@]host:port/db"),
        ("redis://[user:pass@]host:6379/0?prefix=lmcache:", "redis://[user:pass@]host:6379/0?prefix=lmcache:"),
        ("redis://[admin:hunter2@]h:1/0", "redis://[admin:***@]h:1/0"),
        ("redis://[hunter2@]h:1/0", "redis://[***@]h:1/0"),
    ],
)
def test_mask_url_masks_nested_urls_and_every_secret_and_keeps_the_rest(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert SECRET not in mask_url(url)


def test_mask_url_masks_secret_pairs_that_lost_their_query_to_a_mistyped_password() -> None:
    # The last '@' sits in the query, so everything before it is masked as userinfo,
    # the '?' with it; the pairs after it, no longer behind a '?', are masked all the same.
    masked = mask_url("redis://u:hunter2@h/0?token=a@b&secret=hunter2")
    assert SECRET not in masked and masked.startswith("redis://u:***@") and masked.endswith("&secret=***")


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("s3://b/p?secret=hunter2: list: X", "s3://b/p?secret=***: list: X"),  # the ':' was eaten
        ("(redis://h:1/0?token=hunter2).", "(redis://h:1/0?token=***)."),
        ('name "AKIA:hunter2@bucket": bad', 'name "AKIA:***@bucket": bad'),  # botocore's bucket
        ("expected redis://[user:pw@]host:port/db", "expected redis://[user:pw@]host:port/db"),
        ("key vllm@org/m:v1@1@0@ab0f, got it", "key vllm@org/m:v1@1@0@ab0f, got it"),
        ("(fmt@model@world_size@worker_id@hash) a@b.com", "(fmt@model@world_size@worker_id@hash) a@b.com"),
    ],
)
def test_mask_secrets_in_keeps_the_text_around_a_url(text: str, masked: str) -> None:
    assert mask_secrets_in(text) == masked


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIA:hunter2@bucket/p",
        "s3://AKIA:abc/hunter2@bucket/p",  # an AWS secret with a '/': the bucket ends early
        "s3://hunter2@bucket",
        "S3A://AKIA:hunter2@bucket/p?endpoint_url=http://127.0.0.1:1",
        "fsspec+s3://AKIA:hunter2@bucket/p",
    ],
)
def test_an_s3_remote_url_with_credentials_is_refused_saying_where_they_go(url: str, tmp_path: Path) -> None:
    import yaml

    conf = tmp_path / "lmcache.yaml"
    conf.write_text(yaml.safe_dump({"remote_url": url}))
    for attempt in (
        lambda: LMCacheEngineConfig.from_defaults(remote_url=url),
        lambda: LMCacheEngineConfig.from_env({"LMCACHE_REMOTE_URL": url}),
        lambda: LMCacheEngineConfig.from_file(conf),
        lambda: LMCacheEngineConfig().replace(remote_url=url),  # what open_backend does with --store
    ):
        with pytest.raises(ConfigError, match="takes no user:password") as info:
            attempt()
        message = str(info.value)
        assert info.value.field == "remote_url"
        assert SECRET not in message and "abc/" not in message
        assert "***@bucket" in message and "AWS_ACCESS_KEY_ID" in message and "~/.aws/credentials" in message


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/prefix?endpoint_url=http://127.0.0.1:1",
        "s3://bucket/dir@x/y",  # '@' in an object path is fine
        "abfs://container@account.dfs.core.windows.net/p",  # Azure's '@' is part of the URL
        "gs://bucket/p",
        "redis://:hunter2@h:6379/0",
    ],
)
def test_remote_urls_without_s3_userinfo_are_accepted(url: str) -> None:
    assert LMCacheEngineConfig(remote_url=url).remote_url == url
