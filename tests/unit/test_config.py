"""Config loading: flags beat environment beats defaults; bad values name their key."""

from __future__ import annotations

import pytest
from meshllm.common.config import format_size, parse_size
from meshllm.common.errors import ConfigError
from meshllm.common.membership import LeaseConfig
from meshllm.gateway.config import load_config as gateway_config
from meshllm.planner.config import load_config as planner_config
from meshllm.worker.config import load_config as worker_config


@pytest.mark.parametrize(("text", "expected"), [
    ("1024", 1024), ("1KiB", 1024), ("2GiB", 2 * 1024**3), ("2G", 2 * 10**9),
    ("512mib", 512 * 1024**2), ("1.5GiB", 3 * 1024**3 // 2), ("300MB", 300 * 10**6),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1GiB", "0", "12XB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(3 * 1024**3 // 2) == "1.5 GiB"


def test_worker_flags_override_environment() -> None:
    env = {"MESHLLM_WORKER_MEMORY": "1GiB", "MESHLLM_THREADS": "3",
           "MESHLLM_WORKER_LISTEN": "127.0.0.1:7000"}
    cfg = worker_config(["--worker-memory", "2GiB"], env)
    assert cfg.memory_budget_bytes == 2 * 1024**3
    assert cfg.threads == 3
    assert cfg.advertise_address == "127.0.0.1:7000"
    assert cfg.worker_id.endswith("-7000")


@pytest.mark.parametrize(("argv", "env", "key"), [
    (["--worker-memory", "lots"], {}, "--worker-memory / MESHLLM_WORKER_MEMORY"),
    ([], {"MESHLLM_THREADS": "0"}, "--threads / MESHLLM_THREADS"),
    ([], {"MESHLLM_BACKEND": "tpu"}, "--backend / MESHLLM_BACKEND"),
    (["--listen", "nowhere"], {}, "--listen / MESHLLM_WORKER_LISTEN"),
    ([], {"MESHLLM_LEASE_TTL_S": "2", "MESHLLM_KEEPALIVE_S": "3"}, "lease"),
])
def test_worker_bad_values_name_the_key(argv: list[str], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        worker_config(argv, env)
    assert info.value.key == key


def test_planner_models_list() -> None:
    cfg = planner_config([], {"MESHLLM_MODELS": "gemma3-270m, /m/x.gguf"})
    assert cfg.models == ("gemma3-270m", "/m/x.gguf")
    assert cfg.context_length_tokens == 4096


def test_gateway_listen() -> None:
    cfg = gateway_config(["--listen", "127.0.0.1:8000"], {})
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8000)
    with pytest.raises(ConfigError):
        gateway_config([], {"MESHLLM_TOKEN_TIMEOUT_S": "-1"})


def test_lease_ttl_must_cover_two_keepalives() -> None:
    LeaseConfig(ttl_s=6, keepalive_s=3)
    with pytest.raises(ConfigError):
        LeaseConfig(ttl_s=5, keepalive_s=3)
