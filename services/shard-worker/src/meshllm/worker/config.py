"""Shard-worker configuration: flags and MESHLLM_* environment variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.config import (
    Option,
    parse_host_port,
    parse_size,
    positive_float,
    positive_int,
    read_options,
)
from meshllm.common.errors import ConfigError
from meshllm.common.membership import LeaseConfig


@dataclass(frozen=True)
class WorkerConfig:
    etcd_url: str
    listen: str                 # host:port of the ShardWorker gRPC service
    advertise_address: str      # host:port other services use to reach it
    worker_id: str
    memory_budget_bytes: int    # what this worker offers the planner
    threads: int                # llama.cpp threads per engine
    backend: str
    lease: LeaseConfig
    restart_backoff_s: float    # pause before restarting a crashed engine
    metrics_port: int
    log_level: str


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
    Option("--etcd", "MESHLLM_ETCD", str, "http://127.0.0.1:2379", "etcd URL"),
    Option("--listen", "MESHLLM_WORKER_LISTEN", str, "0.0.0.0:9340", "gRPC listen address"),
    Option("--advertise-address", "MESHLLM_ADVERTISE_ADDRESS", str, "",
           "host:port others reach this worker at (default 127.0.0.1:<listen port>)"),
    Option("--worker-id", "MESHLLM_WORKER_ID", str, "", "unique id (default hostname-port)"),
    Option("--worker-memory", "MESHLLM_WORKER_MEMORY", _budget, "auto",
           "memory budget, e.g. 4GiB (auto: 80%% of available memory)"),
    Option("--threads", "MESHLLM_THREADS", _threads, "auto", "llama.cpp threads"),
    Option("--backend", "MESHLLM_BACKEND", str, "cpu", "cpu | cuda | rocm | vulkan"),
    Option("--lease-ttl-s", "MESHLLM_LEASE_TTL_S", positive_int, "10",
           "seconds after death until the worker leaves the mesh"),
    Option("--keepalive-s", "MESHLLM_KEEPALIVE_S", positive_float, "3", "lease refresh period"),
    Option("--restart-backoff-s", "MESHLLM_RESTART_BACKOFF_S", positive_float, "1",
           "seconds before restarting a crashed engine"),
    Option("--metrics-port", "MESHLLM_METRICS_PORT", int, "0", "Prometheus port (0: off)"),
    Option("--log-level", "MESHLLM_LOG_LEVEL", str, "INFO", "log level"),
)


def load_config(argv: Sequence[str], env: Mapping[str, str]) -> WorkerConfig:
    v = read_options("mesh-llm worker", OPTIONS, argv, env)
    try:
        _, port = parse_host_port(v["listen"])
    except ValueError as exc:
        raise ConfigError("--listen / MESHLLM_WORKER_LISTEN", str(exc)) from exc
    if v["backend"] not in ("cpu", "cuda", "rocm", "vulkan"):
        raise ConfigError("--backend / MESHLLM_BACKEND", f"unknown backend {v['backend']!r}")
    return WorkerConfig(
        etcd_url=v["etcd"], listen=v["listen"],
        advertise_address=v["advertise_address"] or f"127.0.0.1:{port}",
        worker_id=v["worker_id"] or f"{socket.gethostname()}-{port}",
        memory_budget_bytes=v["worker_memory"], threads=v["threads"], backend=v["backend"],
        lease=LeaseConfig(v["lease_ttl_s"], v["keepalive_s"]),
        restart_backoff_s=v["restart_backoff_s"], metrics_port=v["metrics_port"],
        log_level=v["log_level"],
    )
