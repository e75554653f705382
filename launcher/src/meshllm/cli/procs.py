"""Child processes of a local mesh: started with logs under the data directory, stopped
in reverse order with SIGTERM, then SIGKILL for any that do not exit in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_S = 10.0


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ProcessGroup:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "GGML_NO_BACKTRACE": "1",
                     **(env or {})},
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.alive():
                child.popen.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                print(f"  {child.name} did not stop in {STOP_GRACE_S:.0f}s: killing it",
                      file=sys.stderr)
                os.killpg(child.popen.pid, signal.SIGKILL)
                child.popen.wait()


def service_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
