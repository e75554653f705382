"""`mesh-llm up`'s configuration: its options (flag, else variable, else default), the
frozen `UpConfig` they load into, and the environment its children start with."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshllm.blackboard.config import OPTIONS as BLACKBOARD_OPTIONS
from meshllm.cli.procs import child_environment
from meshllm.common.config import (
    ETCD_OPTION,
    Option,
    choice,
    on_off,
    parse_size,
    port_number,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.gateway.config import API_KEY_OPTION, API_KEYS_FILE_OPTION, default_host
from meshllm.gateway.config import OPTIONS as GATEWAY_OPTIONS
from meshllm.planner.config import OPTIONS as PLANNER_OPTIONS
from meshllm.planner.config import chat_templates, deterministic_modes
from meshllm.worker.config import OPTIONS as WORKER_OPTIONS
from meshllm.worker.config import spare_memory_bytes

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_DATA_DIR = "~/.local/share/mesh-llm"  # also where `mesh-llm status` looks
# Every option of every service `up` starts: their per-process variables reach no child.
SERVICE_OPTIONS = (*PLANNER_OPTIONS, *BLACKBOARD_OPTIONS, *WORKER_OPTIONS, *GATEWAY_OPTIONS)


@dataclass(frozen=True)
class UpConfig:
    workers: int
    models: tuple[str, ...]     # catalog names or .gguf paths
    split: tuple[str, ...]      # models to split across workers even when one holds them
    chat_templates: tuple[str, ...]  # NAME | FILE | MODEL=NAME|FILE, for the planner
    rpc_transport: str          # tunnel | direct
    port: int                   # TCP port of the gateway
    blackboard_port: int        # TCP port of the local blackboard node (the CLI's default)
    worker_memory_bytes: int    # budget each worker advertises
    threads: int                # llama.cpp threads per worker
    data_dir: Path
    etcd_url: str               # "" : start one under data_dir
    context_length_tokens: int
    slots: int                  # requests each engine decodes at once (the planner's --slots)
    deterministic: tuple[str, ...]  # the planner's --deterministic: on | off | MODEL=on|off
    ready_timeout_s: float
    require_models: bool        # exit non-zero (after stopping) when a model is not served
    open_console: bool          # open the console in a browser once ready
    api_keys: tuple[str, ...]   # keys the gateway accepts (() : it takes anyone)
    api_keys_file: str          # a keys file for the gateway ("" : none)
    tls: bool                   # mutual TLS on every gRPC link, HTTPS at the gateway
    host: str                   # the gateway's listen address: 0.0.0.0 with keys, else loopback
    child_env: Mapping[str, str]  # environment every child starts with: child_environment()


def _worker_memory(text: str) -> int:
    return 0 if text == "auto" else parse_size(text)   # 0: decided once workers are known


def _threads(text: str) -> int:
    value = 0 if text == "auto" else int(text)          # 0 (or auto): cores / workers
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


UP_OPTIONS = (
    Option("--workers", "MESHLLM_UP_WORKERS", positive_int, "2", "shard-workers to start"),
    Option("--model", "MESHLLM_MODELS", str, DEFAULT_MODEL,
           "model to serve: a catalog name or a .gguf path", repeat=True),
    Option("--split", "MESHLLM_SPLIT", str, "",
           "split this model across workers even if one could hold it", repeat=True),
    Option("--chat-template", "MESHLLM_CHAT_TEMPLATE", str, "",
           "chat template override: a built-in NAME (gemma, chatml) or a Jinja FILE, for "
           "all models or as MODEL=NAME|FILE", repeat=True),
    Option("--rpc-transport", "MESHLLM_RPC_TRANSPORT", choice("tunnel", "direct"), "tunnel",
           "how split stages talk: ggml RPC inside gRPC (tunnel) or plain TCP (direct)"),
    Option("--port", "MESHLLM_UP_PORT", port_number, "9337", "gateway port"),
    Option("--blackboard-port", "MESHLLM_UP_BLACKBOARD_PORT", port_number, "9339",
           "blackboard gRPC port, where `mesh-llm blackboard` looks"),
    Option("--worker-memory", "MESHLLM_WORKER_MEMORY", _worker_memory, "auto",
           "memory budget per worker, e.g. 2GiB (auto: what the machine can spare, split "
           "between the workers)"),
    Option("--threads", "MESHLLM_THREADS", _threads, "auto",
           "llama.cpp threads per worker (auto: cores / workers)"),
    Option("--data-dir", "MESHLLM_UP_DATA_DIR", Path, DEFAULT_DATA_DIR,
           "etcd data, logs and state"),
    dataclasses.replace(ETCD_OPTION, default="",
                        help="use this etcd URL instead of starting one"),
    Option("--context-length", "MESHLLM_CONTEXT_LENGTH", positive_int, "4096",
           "context length in tokens per engine"),
    # The planner's own option: one default and one help text for both commands.
    next(o for o in PLANNER_OPTIONS if o.flag == "--slots"),
    next(o for o in PLANNER_OPTIONS if o.flag == "--deterministic"),
    Option("--ready-timeout-s", "MESHLLM_UP_READY_TIMEOUT_S", positive_float, "900",
           "seconds to wait for every model to serve"),
    Option("--require-models", "MESHLLM_UP_REQUIRE_MODELS", on_off, "false",
           "stop the mesh and exit non-zero when a model is not served", switch=True),
    Option("--open", "MESHLLM_UP_OPEN", on_off, "false",
           "open the console in a browser once ready", switch=True),
    Option("--host", "MESHLLM_UP_HOST", str, "",
           "address the gateway listens on (default: 0.0.0.0 with API keys, 127.0.0.1 "
           "without: an open mesh is not exposed to other machines unless asked)"),
    Option("--tls", "MESHLLM_UP_TLS", on_off, "false",
           "make a local CA under the data directory: mutual TLS between every service, "
           "HTTPS at the gateway", switch=True),
    API_KEY_OPTION,  # handed to the gateway in its environment: argv would show in `ps`
    API_KEYS_FILE_OPTION,
)
def load_up_config(argv: Sequence[str], env: Mapping[str, str]) -> UpConfig:
    """`mesh-llm up`'s whole configuration; a bad value raises ConfigError naming the flag
    and the variable."""
    v = read_options("mesh-llm up", UP_OPTIONS, argv, env)
    workers = v["workers"]
    chat_templates(v["chat_template"])  # a bad name or file fails here, before any service
    deterministic_modes(v["deterministic"])  # and so does a bad --deterministic entry
    return UpConfig(
        workers=workers, models=v["model"] or (DEFAULT_MODEL,), split=v["split"],
        chat_templates=v["chat_template"],
        rpc_transport=v["rpc_transport"], port=v["port"],
        blackboard_port=v["blackboard_port"],
        worker_memory_bytes=v["worker_memory"] or spare_memory_bytes() // workers,
        threads=v["threads"] or max(1, (os.cpu_count() or 1) // workers),
        data_dir=v["data_dir"].expanduser().resolve(), etcd_url=v["etcd"],
        context_length_tokens=v["context_length"], slots=v["slots"],
        deterministic=tuple(v["deterministic"]),
        ready_timeout_s=v["ready_timeout_s"],
        require_models=v["require_models"], open_console=v["open"], api_keys=v["api_key"],
        api_keys_file=str(Path(v["api_keys_file"]).expanduser().resolve())
        if v["api_keys_file"] else "", tls=v["tls"],
        host=v["host"] or default_host(bool(v["api_key"] or v["api_keys_file"])),
        child_env=child_environment(env, SERVICE_OPTIONS),
    )
