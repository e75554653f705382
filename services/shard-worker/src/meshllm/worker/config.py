"""Shard-worker configuration: flags and MESHLLM_* environment variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.config import (
    ADVERTISE_ADDRESS_OPTION,
    ETCD_OPTION,
    LEASE_TTL_OPTION,
    LOG_LEVEL_OPTION,
    METRICS_PORT_OPTION,
    Option,
    listen_option,
    on_off,
    parse_host_port,
    parse_size,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.membership import LeaseConfig
from meshllm.common.telemetry import TraceSettings, trace_settings
from meshllm.common.tls import TLS_OPTIONS, GrpcSecurity, security_from
from meshllm.worker.engine_wire import DEFAULT_MAX_QUEUE


@dataclass(frozen=True)
class WorkerConfig:
    etcd_url: str
    listen: str                 # host:port of the ShardWorker gRPC service
    advertise_address: str      # host:port other services use to reach it
    worker_id: str
    memory_budget_bytes: int    # what this worker offers the planner
    threads: int                # llama.cpp threads per engine
    backend: str                # cpu | cuda | rocm | vulkan
    lease: LeaseConfig          # TTL and keep-alive period (s) of this worker's etcd record
    restart_backoff_s: float    # pause before restarting a crashed engine
    rpc_transport: str          # tunnel: ggml RPC inside gRPC streams; direct: plain TCP
    rpc_library: str            # meshllm: our ggml-rpc build (fewer thread hand-offs); stock
    cache_dir: Path             # RPC tensor cache of this worker's stages
    prime_stage_cache: bool     # a stage fills cache_dir from its own copy of the model file
    data_dir: Path              # expert shards cut from MoE models live under shards/
    ping_interval_s: float      # how often round trips to the other workers are measured
    weight_repack: bool         # llama.cpp's CPU weight repacking: faster, but split != whole
    max_queue: int              # requests waiting for a free slot before the worker is busy
    drain_grace_s: float        # a retiring model unloads after this long with no request
    drain_timeout_s: float      # ... or after this long draining, cutting what still runs
    load_publish_s: float       # at most one record write per this long for slot-use changes
    metrics_port: int           # TCP port of the Prometheus endpoint; 0: off
    log_level: str              # logging level name
    trace: TraceSettings        # what the OTEL_* variables ask for
    security: GrpcSecurity      # plaintext or mutual TLS for all of this worker's gRPC
    child_env: Mapping[str, str]  # environment of engine and stage child processes


def spare_memory_bytes() -> int:
    """Default budget: 80% of the memory the machine has available now."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * 8 // 10
    raise ConfigError("--worker-memory", "cannot read /proc/meminfo: set it explicitly")


def _budget(text: str) -> int:
    return spare_memory_bytes() if text == "auto" else parse_size(text)


def _threads(text: str) -> int:
    return os.cpu_count() or 1 if text == "auto" else positive_int(text)


OPTIONS = (
    ETCD_OPTION,
    listen_option("MESHLLM_WORKER_LISTEN", "0.0.0.0:9340", "gRPC"),
    ADVERTISE_ADDRESS_OPTION,
    Option("--worker-id", "MESHLLM_WORKER_ID", str, "", "unique id (default hostname-port)",
           per_process=True),
    Option("--worker-memory", "MESHLLM_WORKER_MEMORY", _budget, "auto",
           "memory budget, e.g. 4GiB (auto: 80%% of available memory)"),
    Option("--threads", "MESHLLM_THREADS", _threads, "auto", "llama.cpp threads"),
    Option("--backend", "MESHLLM_BACKEND", str, "cpu", "cpu | cuda | rocm | vulkan"),
    LEASE_TTL_OPTION,
    Option("--keepalive-s", "MESHLLM_KEEPALIVE_S", positive_float, "3", "lease refresh period"),
    Option("--restart-backoff-s", "MESHLLM_RESTART_BACKOFF_S", positive_float, "1",
           "seconds before restarting a crashed engine"),
    Option("--rpc-transport", "MESHLLM_RPC_TRANSPORT", str, "tunnel",
           "tunnel (ggml RPC inside the mesh's gRPC) | direct (trusted networks only)"),
    Option("--rpc-library", "MESHLLM_RPC_LIBRARY", str, "meshllm",
           "ggml RPC implementation for split models: meshllm (built by make install; "
           "faster) | stock (llama-cpp-python's own)"),
    Option("--cache-dir", "MESHLLM_CACHE_DIR", str, "", "RPC tensor cache directory "
           "(default ~/.cache/mesh-llm/rpc-<worker id>)", per_process=True),
    Option("--prime-stage-cache", "MESHLLM_PRIME_STAGE_CACHE", on_off, "on",
           "on: a stage writes its layers' weights into its RPC cache from this worker's "
           "copy of the model file, so the head sends hashes, not the bytes"),
    Option("--data-dir", "MESHLLM_WORKER_DATA_DIR", str, "~/.cache/mesh-llm",
           "where the worker keeps what it builds: expert shards of mixture-of-experts "
           "models under shards/ (workers of one machine may share it)", per_process=True),
    Option("--ping-interval-s", "MESHLLM_PING_INTERVAL_S", positive_float, "5",
           "seconds between round-trip measurements to other workers"),
    Option("--weight-repack", "MESHLLM_WEIGHT_REPACK", on_off, "off",
           "on: llama.cpp's CPU weight repacking (faster on some CPUs; split models then "
           "answer slightly differently from whole ones)"),
    Option("--max-queue", "MESHLLM_MAX_QUEUE", int, str(DEFAULT_MAX_QUEUE),
           "requests waiting for a free slot per model before answering busy (429)"),
    Option("--drain-grace-s", "MESHLLM_DRAIN_GRACE_S", positive_float, "2",
           "seconds a retiring model must go without a request before it unloads"),
    Option("--drain-timeout-s", "MESHLLM_DRAIN_TIMEOUT_S", positive_float, "600",
           "seconds a retiring model may drain before it unloads anyway, cutting its streams"),
    Option("--load-publish-s", "MESHLLM_LOAD_PUBLISH_S", positive_float, "1",
           "least seconds between record writes caused by slot use changing"),
    METRICS_PORT_OPTION,
    LOG_LEVEL_OPTION,
    *TLS_OPTIONS,
)


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> WorkerConfig:
    v = read_options("mesh-llm worker", OPTIONS, argv, env)
    try:
        _, port = parse_host_port(v["listen"])
    except ValueError as exc:
        raise ConfigError("--listen / MESHLLM_WORKER_LISTEN", str(exc)) from exc
    if v["rpc_transport"] not in ("tunnel", "direct"):
        raise ConfigError("--rpc-transport / MESHLLM_RPC_TRANSPORT",
                          f"expected tunnel or direct, got {v['rpc_transport']!r}")
    if v["rpc_library"] not in ("meshllm", "stock"):
        raise ConfigError("--rpc-library / MESHLLM_RPC_LIBRARY",
                          f"expected meshllm or stock, got {v['rpc_library']!r}")
    if v["backend"] not in ("cpu", "cuda", "rocm", "vulkan"):
        raise ConfigError("--backend / MESHLLM_BACKEND", f"unknown backend {v['backend']!r}")
    worker_id = v["worker_id"] or f"{socket.gethostname()}-{port}"
    cache = Path(v["cache_dir"] or Path.home() / ".cache" / "mesh-llm" / f"rpc-{worker_id}")
    return WorkerConfig(
        etcd_url=v["etcd"], listen=v["listen"],
        advertise_address=v["advertise_address"] or f"127.0.0.1:{port}",
        worker_id=worker_id, rpc_transport=v["rpc_transport"], rpc_library=v["rpc_library"],
        cache_dir=cache.expanduser(), prime_stage_cache=v["prime_stage_cache"],
        data_dir=Path(v["data_dir"]).expanduser(),
        ping_interval_s=v["ping_interval_s"], weight_repack=v["weight_repack"],
        max_queue=v["max_queue"], drain_grace_s=v["drain_grace_s"],
        drain_timeout_s=v["drain_timeout_s"], load_publish_s=v["load_publish_s"],
        memory_budget_bytes=v["worker_memory"], threads=v["threads"], backend=v["backend"],
        lease=LeaseConfig(v["lease_ttl_s"], v["keepalive_s"]),
        restart_backoff_s=v["restart_backoff_s"], metrics_port=v["metrics_port"],
        log_level=v["log_level"],
        trace=trace_settings("worker", env), security=security_from(v),
        # ggml would attach gdb to an aborting child for a backtrace: slow, and useless here
        child_env={**env, "GGML_NO_BACKTRACE": "1"},
    )
