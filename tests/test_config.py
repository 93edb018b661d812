"""LMCacheEngineConfig: defaults, YAML, environment, validation, masking."""

from __future__ import annotations

import logging

import pytest
import torch

from lmcache_core import LMCacheEngineConfig, LMCacheEngineMetadata, LMCacheMemPoolMetadata
from lmcache_core.config import mask_url


def test_defaults_switch_remote_and_disk_off():
    cfg = LMCacheEngineConfig.from_defaults()
    assert cfg.chunk_size == 256 and cfg.local_device == "cpu"
    assert cfg.remote_url is None and cfg.disk_path is None
    assert cfg.memory_budget_bytes == 5 * 1024**3


def test_every_field_as_keyword():
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=128,
        local_device="cpu",
        max_local_cache_size=0.5,
        remote_url="redis://localhost:6379",
        remote_serde="safetensors",
        pipelined_backend=True,
        local_disk="/tmp/x",
        max_local_disk_size=2,
    )
    assert cfg.chunk_size == 128 and cfg.pipelined_backend is True
    assert cfg.disk_budget_bytes == 2 * 1024**3
    assert cfg.memory_budget_bytes == 512 * 1024**2
    assert cfg.sources["chunk_size"] == "argument"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"chunk_sise": 1}, "chunk_sise"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": "many"}, "chunk_size"),
        ({"local_device": "tpu"}, "local_device"),
        ({"max_local_cache_size": -1}, "max_local_cache_size"),
        ({"remote_url": "localhost:6379"}, "remote_url"),
        ({"remote_serde": "cachegen"}, "remote_serde"),
        ({"remote_serde": "json"}, "remote_serde"),
        ({"pipelined_backend": "maybe"}, "pipelined_backend"),
    ],
)
def test_invalid_fields_name_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        LMCacheEngineConfig.from_defaults(**overrides)


def test_legacy_serde_maps_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = LMCacheEngineConfig.from_defaults(remote_serde="torch")
    assert cfg.remote_serde == "safetensors"
    assert "safetensors" in caplog.text


def test_disk_from_local_device_file_url():
    cfg = LMCacheEngineConfig.from_defaults(local_device="file:///var/cache/kv", max_local_cache_size=3)
    assert cfg.disk_path == "/var/cache/kv"
    assert cfg.local_memory_device is None
    assert cfg.disk_budget_bytes == 3 * 1024**3


def test_from_file_lmcache_yaml(tmp_path):
    p = tmp_path / "lmcache.yaml"
    p.write_text(
        'chunk_size: 256\nlocal_device: "cpu"\nmax_local_cache_size: 5\n'
        'remote_url: "redis://localhost:6379"\nremote_serde: "safetensors"\npipelined_backend: true\n'
        "save_decode_cache: false\n"
    )
    cfg = LMCacheEngineConfig.from_file(p)
    assert cfg.remote_url == "redis://localhost:6379" and cfg.pipelined_backend is True
    assert cfg.sources["remote_url"] == f"file {p}"


def test_from_file_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        LMCacheEngineConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        LMCacheEngineConfig.from_file(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("chunk_size: 256\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        LMCacheEngineConfig.from_file(unknown)


def test_from_env_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("chunk_size: 64\nmax_local_cache_size: 1\n")
    env = {"LMCACHE_CONFIG_FILE": str(p), "LMCACHE_CHUNK_SIZE": "32", "LMCACHE_PIPELINED_BACKEND": "true"}
    cfg = LMCacheEngineConfig.from_env(env)
    assert cfg.chunk_size == 32 and cfg.max_local_cache_size == 1.0 and cfg.pipelined_backend
    assert cfg.sources["chunk_size"] == "env LMCACHE_CHUNK_SIZE"
    assert cfg.sources["max_local_cache_size"] == f"file {p}"
    with pytest.raises(ValueError, match="chunk_size"):
        LMCacheEngineConfig.from_env({"LMCACHE_CHUNK_SIZE": "-3"})


@pytest.mark.parametrize(
    "url, masked",
    [
        ("redis://user:hunter2@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:hunter2@host:6379", "redis://:***@host:6379"),
        ("s3://bucket/prefix?secret=hunter2&region=x", "s3://bucket/prefix?secret=***&region=x"),
        ("redis://host:6379", "redis://host:6379"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked
    assert "hunter2" not in mask_url(url)


def test_to_dict_masks_secrets():
    cfg = LMCacheEngineConfig.from_defaults(remote_url="redis://u:hunter2@h:1")
    assert "hunter2" not in str(cfg.to_dict())


def test_metadata_keywords():
    m = LMCacheEngineMetadata(model_name="m", world_size=2, worker_id=1, fmt="huggingface", kv_dtype=torch.bfloat16, kv_shape=[32, 2, 256, 8, 128])
    assert m.kv_shape == (32, 2, 256, 8, 128)
    p = LMCacheMemPoolMetadata(kv_shape=[1, 2, 3], kv_dtype=torch.float16, max_local_cache_size=1)
    assert p.kv_shape == (1, 2, 3)
    with pytest.raises(ValueError, match="fmt"):
        LMCacheEngineMetadata(model_name="m", fmt="tf")
