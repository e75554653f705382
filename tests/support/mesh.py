"""A real local mesh for integration tests: etcd, planner, workers and gateway as
separate processes on free loopback ports."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import Proc, free_port, python_module, start_etcd, wait_until


@dataclass(frozen=True)
class MeshOptions:
    workers: int = 2
    worker_memory: str = "1GiB"
    threads: int = 1
    models: tuple[str, ...] = ("gemma3-270m",)
    context_length: int = 4096
    lease_ttl_s: int = 4
    keepalive_s: float = 1.0
    expect_replicas: int = 0   # ready replicas to wait for (0: one per worker)
    worker_memories: tuple[str, ...] = ()  # per worker, overriding worker_memory
    per_worker_args: tuple[tuple[str, ...], ...] = ()  # per worker, after worker_args
    # per worker, a command its own runs under (e.g. `unshare` hiding a directory from it)
    per_worker_prefix: tuple[tuple[str, ...], ...] = ()
    planner_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    gateway_args: tuple[str, ...] = ()


def get_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.load(response)


@dataclass
class LocalMesh:
    root: Path
    options: MeshOptions = field(default_factory=MeshOptions)
    procs: dict[str, Proc] = field(default_factory=dict)
    worker_ports: dict[str, int] = field(default_factory=dict)
    etcd_url: str = ""
    gateway_port: int = 0
    planner_port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        etcd, self.etcd_url = start_etcd(self.root / "etcd", logs)
        self.procs["etcd"] = etcd
        o = self.options
        self.planner_port = free_port()
        self.procs["planner"] = Proc("planner", python_module(
            "meshllm.planner", "--etcd", self.etcd_url,
            "--listen", f"127.0.0.1:{self.planner_port}",
            "--models", ",".join(o.models), "--context-length", str(o.context_length),
            *o.planner_args), logs)
        for i in range(1, o.workers + 1):
            self.start_worker(f"worker-{i}")
        self.gateway_port = free_port()
        self.procs["gateway"] = Proc("gateway", python_module(
            "meshllm.gateway", "--etcd", self.etcd_url,
            "--listen", f"127.0.0.1:{self.gateway_port}", *o.gateway_args), logs)
        self.wait_ready(o.expect_replicas or o.workers)

    def start_worker(self, name: str) -> None:
        o = self.options
        index = int(name.rsplit("-", 1)[1]) - 1
        memory = o.worker_memories[index] if index < len(o.worker_memories) else o.worker_memory
        port = self.worker_ports.get(name) or free_port()
        self.worker_ports[name] = port
        prefix = o.per_worker_prefix[index] if index < len(o.per_worker_prefix) else ()
        self.procs[name] = Proc(name, [*prefix, *python_module(
            "meshllm.worker", "--etcd", self.etcd_url, "--listen", f"127.0.0.1:{port}",
            "--worker-id", name, "--worker-memory", memory, "--threads", str(o.threads),
            "--lease-ttl-s", str(o.lease_ttl_s), "--keepalive-s", str(o.keepalive_s),
            "--cache-dir", str(self.root / f"rpc-cache-{name}"), *o.worker_args,
            *(o.per_worker_args[index] if index < len(o.per_worker_args) else ()))],
            self.root / "logs")

    def status(self) -> dict[str, Any]:
        return dict(get_json(self.base_url + "/api/status"))

    def ready_replicas(self, model: str = "gemma3-270m") -> int:
        try:
            status = self.status()
        except (urllib.error.URLError, OSError):
            return -1
        return next((m["ready_replicas"] for m in status["models"] if m["model_id"] == model), -1)

    def wait_ready(self, replicas: int, timeout_s: float = 180.0) -> None:
        def ready() -> bool:
            dead = [p.name for p in self.procs.values() if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead} exited:\n" + self.procs[dead[0]].log_tail())
            return self.ready_replicas() >= replicas

        wait_until(ready, timeout_s, f"{replicas} ready replicas")

    def worker_ids_in_status(self) -> set[str]:
        return {n["worker_id"] for n in self.status()["nodes"]}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(2000)}" for p in self.procs.values())

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()


def wait_for(check: Any, timeout_s: float, what: str) -> float:
    """Wait until `check()` is true; returns how long it took."""
    started = time.monotonic()
    wait_until(check, timeout_s, what)
    return time.monotonic() - started
