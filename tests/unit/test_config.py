"""Config loading: flags beat environment beats defaults; bad values name their key."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from meshllm.blackboard.config import OPTIONS as BLACKBOARD_OPTIONS
from meshllm.blackboard.config import load_config as blackboard_config
from meshllm.cli.blackboard_cmd import load_cli_config
from meshllm.cli.procs import child_environment
from meshllm.cli.up_config import SERVICE_OPTIONS, UP_OPTIONS, load_up_config
from meshllm.common.config import (
    ADVERTISE_ADDRESS_OPTION,
    ETCD_OPTION,
    LEASE_TTL_OPTION,
    LOG_LEVEL_OPTION,
    METRICS_PORT_OPTION,
    Option,
    format_size,
    parse_size,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.membership import LeaseConfig
from meshllm.common.tls import TLS_OPTIONS
from meshllm.gateway.config import OPTIONS as GATEWAY_OPTIONS
from meshllm.gateway.config import load_config as gateway_config
from meshllm.planner.config import OPTIONS as PLANNER_OPTIONS
from meshllm.planner.config import load_config as planner_config
from meshllm.worker.config import OPTIONS as WORKER_OPTIONS
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


# --- options shared by the services: declared once, one field name per concept ---

SERVICE_OPTION_SETS = {"gateway": GATEWAY_OPTIONS, "planner": PLANNER_OPTIONS,
                       "worker": WORKER_OPTIONS, "blackboard": BLACKBOARD_OPTIONS}
SHARED = {opt.flag: opt for opt in (ETCD_OPTION, LOG_LEVEL_OPTION, METRICS_PORT_OPTION,
                                    LEASE_TTL_OPTION, ADVERTISE_ADDRESS_OPTION, *TLS_OPTIONS)}


@pytest.mark.parametrize("service", sorted(SERVICE_OPTION_SETS))
def test_services_use_the_one_declaration_of_each_shared_option(service: str) -> None:
    for opt in SERVICE_OPTION_SETS[service]:
        if opt.flag in SHARED:
            assert opt is SHARED[opt.flag], f"{service} redeclares {opt.flag}"


def test_every_variable_is_declared_once_across_the_services() -> None:
    declared: dict[str, Option] = {}
    for options in SERVICE_OPTION_SETS.values():
        for opt in options:
            assert declared.setdefault(opt.env, opt) is opt, f"{opt.env} declared twice"
    assert {"MESHLLM_ETCD", "MESHLLM_LOG_LEVEL", "MESHLLM_TLS_CERT"} <= set(declared)


def test_every_service_has_etcd_log_level_and_tls() -> None:
    for options in SERVICE_OPTION_SETS.values():
        assert {ETCD_OPTION, LOG_LEVEL_OPTION, *TLS_OPTIONS} <= set(options)


@pytest.mark.parametrize(("flag", "per_process"), [
    ("--listen", True), ("--advertise-address", True), ("--metrics-port", True),
    ("--worker-id", True), ("--node-id", True), ("--data-dir", True), ("--cache-dir", True),
    ("--etcd", False), ("--log-level", False), ("--tls-cert", False), ("--lease-ttl-s", False),
    ("--models", False), ("--max-queue", False),
])
def test_which_options_are_per_process(flag: str, per_process: bool) -> None:
    found = [opt for options in SERVICE_OPTION_SETS.values() for opt in options
             if opt.flag == flag]
    assert found
    assert {opt.per_process for opt in found} == {per_process}


def test_shared_fields_have_one_name() -> None:
    blackboard = blackboard_config([], {"MESHLLM_ETCD": "http://e:1", "MESHLLM_LEASE_TTL_S": "9"})
    worker = worker_config([], {"MESHLLM_ETCD": "http://e:1", "MESHLLM_LEASE_TTL_S": "9"})
    for cfg in (blackboard, worker, planner_config([], {"MESHLLM_ETCD": "http://e:1"}),
                gateway_config([], {"MESHLLM_ETCD": "http://e:1"})):
        assert cfg.etcd_url == "http://e:1"
    assert blackboard.lease.ttl_s == worker.lease.ttl_s == 9


@pytest.mark.parametrize(("text", "expected"), [("debug", "DEBUG"), ("INFO", "INFO"),
                                                (" warning ", "WARNING")])
def test_log_level(text: str, expected: str) -> None:
    assert planner_config([], {"MESHLLM_LOG_LEVEL": text}).log_level == expected


@pytest.mark.parametrize("load", [gateway_config, planner_config, worker_config,
                                  blackboard_config])
def test_bad_log_level_and_metrics_port_name_the_key(
        load: Callable[[list[str], dict[str, str]], object]) -> None:
    with pytest.raises(ConfigError) as info:
        load([], {"MESHLLM_LOG_LEVEL": "loud"})
    assert info.value.key == "--log-level / MESHLLM_LOG_LEVEL"
    if load is not gateway_config:
        with pytest.raises(ConfigError) as info:
            load(["--metrics-port", "70000"], {})
        assert info.value.key == "--metrics-port / MESHLLM_METRICS_PORT"


# --- repeatable options: flag once per item, variable and default comma-separated ---

TAG = Option("--tag", "MESHLLM_TAGS", str, "a,b", "tags", repeat=True)
SIZE = Option("--size", "MESHLLM_SIZES", positive_int, "", "sizes", repeat=True)


@pytest.mark.parametrize(("argv", "env", "expected"), [
    ([], {}, ("a", "b")),
    ([], {"MESHLLM_TAGS": "x, y"}, ("x", "y")),
    ([], {"MESHLLM_TAGS": ""}, ()),
    (["--tag", "p", "--tag", "q"], {"MESHLLM_TAGS": "x"}, ("p", "q")),
    (["--tag", "one"], {}, ("one",)),
])
def test_repeatable_option(argv: list[str], env: dict[str, str],
                           expected: tuple[str, ...]) -> None:
    assert read_options("t", (TAG,), argv, env)["tag"] == expected


def test_repeatable_option_parses_each_item() -> None:
    assert read_options("t", (SIZE,), ["--size", "2", "--size", "3"], {})["size"] == (2, 3)
    assert read_options("t", (SIZE,), [], {"MESHLLM_SIZES": "4,5"})["size"] == (4, 5)
    assert read_options("t", (SIZE,), [], {})["size"] == ()
    with pytest.raises(ConfigError) as info:
        read_options("t", (SIZE,), [], {"MESHLLM_SIZES": "4,0"})
    assert info.value.key == "--size / MESHLLM_SIZES"


def test_single_options_stay_single() -> None:
    assert read_options("t", (ETCD_OPTION,), ["--etcd", "a", "--etcd", "b"], {})["etcd"] == "b"


# --- what each child of `mesh-llm up` inherits from up's environment ---

@pytest.mark.parametrize(("name", "reaches_children"), [
    ("MESHLLM_METRICS_PORT", False),
    ("MESHLLM_ADVERTISE_ADDRESS", False),
    ("MESHLLM_WORKER_LISTEN", False),
    ("MESHLLM_GATEWAY_LISTEN", False),
    ("MESHLLM_PLANNER_LISTEN", False),
    ("MESHLLM_BLACKBOARD_LISTEN", False),
    ("MESHLLM_WORKER_ID", False),
    ("MESHLLM_NODE_ID", False),
    ("MESHLLM_DATA_DIR", False),
    ("MESHLLM_CACHE_DIR", False),
    ("OTEL_SERVICE_NAME", False),
    ("MESHLLM_TLS_CERT", True),
    ("MESHLLM_TLS_KEY", True),
    ("MESHLLM_TLS_CA", True),
    ("MESHLLM_TLS_SERVER_NAME", True),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", True),
    ("OTEL_TRACES_SAMPLER", True),
    ("MESHLLM_ETCD", True),
    ("MESHLLM_LOG_LEVEL", True),
    ("MESHLLM_SLOTS", True),
    ("MESHLLM_BACKEND", True),
    ("PATH", True),
    ("HOME", True),
    ("LANG", True),
])
def test_child_environment(name: str, reaches_children: bool) -> None:
    env = child_environment({name: "v", "PATH": "/bin"}, SERVICE_OPTIONS)
    assert (name in env) is reaches_children
    if reaches_children:
        assert env[name] == ("/bin" if name == "PATH" else "v")


def test_child_environment_always_sets_unbuffered_and_no_backtrace() -> None:
    env = child_environment({"GGML_NO_BACKTRACE": "0"}, SERVICE_OPTIONS)
    assert (env["PYTHONUNBUFFERED"], env["GGML_NO_BACKTRACE"]) == ("1", "1")


def test_child_environment_is_pure() -> None:
    parent = {"MESHLLM_METRICS_PORT": "9100", "HOME": "/h"}
    child_environment(parent, SERVICE_OPTIONS)
    assert parent == {"MESHLLM_METRICS_PORT": "9100", "HOME": "/h"}
    assert "X" in child_environment({"X": "1"}, [])  # no declarations: nothing dropped


# --- `mesh-llm up`: flags, else MESHLLM_* variables, else defaults ---

def test_up_defaults() -> None:
    cfg = load_up_config(["--worker-memory", "1GiB"], {})
    assert (cfg.workers, cfg.models, cfg.split, cfg.port, cfg.blackboard_port) == (
        2, ("gemma3-270m",), (), 9337, 9339)
    assert (cfg.rpc_transport, cfg.etcd_url, cfg.context_length_tokens,
            cfg.ready_timeout_s) == ("tunnel", "", 4096, 900.0)
    assert cfg.slots == 8  # llama-server --parallel 8's throughput at 8 streams
    assert cfg.worker_memory_bytes == 1024**3
    assert cfg.threads == max(1, (os.cpu_count() or 1) // 2)
    assert cfg.data_dir == (Path.home() / ".local/share/mesh-llm").resolve()


def test_up_reads_the_environment(tmp_path: Path) -> None:
    env = {"MESHLLM_UP_WORKERS": "3", "MESHLLM_MODELS": "gemma3-270m, /m/x.gguf",
           "MESHLLM_SPLIT": "/m/x.gguf", "MESHLLM_RPC_TRANSPORT": "direct",
           "MESHLLM_UP_PORT": "8000", "MESHLLM_UP_BLACKBOARD_PORT": "8001",
           "MESHLLM_WORKER_MEMORY": "512MiB", "MESHLLM_THREADS": "2",
           "MESHLLM_UP_DATA_DIR": str(tmp_path), "MESHLLM_ETCD": "http://e:2379",
           "MESHLLM_CONTEXT_LENGTH": "2048", "MESHLLM_UP_READY_TIMEOUT_S": "30",
           "MESHLLM_SLOTS": "3",
           "MESHLLM_METRICS_PORT": "9100", "MESHLLM_TLS_CA": "/ca.pem"}
    cfg = load_up_config([], env)
    assert (cfg.workers, cfg.models, cfg.split) == (3, ("gemma3-270m", "/m/x.gguf"),
                                                    ("/m/x.gguf",))
    assert (cfg.rpc_transport, cfg.port, cfg.blackboard_port) == ("direct", 8000, 8001)
    assert (cfg.worker_memory_bytes, cfg.threads) == (512 * 1024**2, 2)
    assert (cfg.data_dir, cfg.etcd_url) == (tmp_path.resolve(), "http://e:2379")
    assert (cfg.context_length_tokens, cfg.ready_timeout_s, cfg.slots) == (2048, 30.0, 3)
    assert "MESHLLM_METRICS_PORT" not in cfg.child_env
    assert cfg.child_env["MESHLLM_TLS_CA"] == "/ca.pem"


def test_up_flags_beat_the_environment() -> None:
    cfg = load_up_config(["--model", "a.gguf", "--model", "b.gguf", "--workers", "1",
                          "--worker-memory", "1GiB", "--threads", "0", "--slots", "2"],
                         {"MESHLLM_MODELS": "c.gguf", "MESHLLM_UP_WORKERS": "4",
                          "MESHLLM_SLOTS": "5"})
    assert (cfg.models, cfg.workers, cfg.slots) == (("a.gguf", "b.gguf"), 1, 2)
    assert cfg.threads == max(1, os.cpu_count() or 1)  # 0: cores / workers


@pytest.mark.parametrize(("argv", "env", "key"), [
    (["--workers", "0"], {}, "--workers / MESHLLM_UP_WORKERS"),
    ([], {"MESHLLM_UP_WORKERS": "two"}, "--workers / MESHLLM_UP_WORKERS"),
    ([], {"MESHLLM_UP_PORT": "70000"}, "--port / MESHLLM_UP_PORT"),
    ([], {"MESHLLM_UP_BLACKBOARD_PORT": "x"}, "--blackboard-port / MESHLLM_UP_BLACKBOARD_PORT"),
    ([], {"MESHLLM_RPC_TRANSPORT": "udp"}, "--rpc-transport / MESHLLM_RPC_TRANSPORT"),
    (["--worker-memory", "lots"], {}, "--worker-memory / MESHLLM_WORKER_MEMORY"),
    ([], {"MESHLLM_THREADS": "-1"}, "--threads / MESHLLM_THREADS"),
    ([], {"MESHLLM_CONTEXT_LENGTH": "0"}, "--context-length / MESHLLM_CONTEXT_LENGTH"),
    (["--slots", "0"], {}, "--slots / MESHLLM_SLOTS"),
    ([], {"MESHLLM_UP_READY_TIMEOUT_S": "soon"},
     "--ready-timeout-s / MESHLLM_UP_READY_TIMEOUT_S"),
])
def test_up_bad_values_name_the_flag_and_variable(argv: list[str], env: dict[str, str],
                                                  key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_up_config(["--worker-memory", "1GiB", *argv], env)
    assert info.value.key == key


def test_up_options_are_documented_in_the_readme() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for opt in UP_OPTIONS:
        assert f"`{opt.env}`" in readme, opt.env


# --- the blackboard commands' settings ---

def test_blackboard_cli_config() -> None:
    assert load_cli_config({"MESHLLM_AUTHOR": "ann"}).default_author == "ann"
    assert not load_cli_config({}).security.tls
    with pytest.raises(ConfigError):
        load_cli_config({"MESHLLM_TLS_CERT": "/c.pem"})  # certificate without key and CA


def test_per_process_variables_are_documented_in_the_readme() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for opt in SERVICE_OPTIONS:
        if opt.per_process:
            assert f"`{opt.env}`" in readme, opt.env


def test_only_process_env_reads_the_environment() -> None:
    root = Path(__file__).parents[2]
    sources = [*root.glob("common/src/**/*.py"), *root.glob("services/*/src/**/*.py"),
               *root.glob("launcher/src/**/*.py"), *root.glob("native/src/**/*.py")]
    reads = re.compile(r"\bos\.(environ|getenv|putenv)\b")
    readers = {str(p.relative_to(root)) for p in sources if reads.search(p.read_text())}
    assert readers == {"common/src/meshllm/common/config.py"}
