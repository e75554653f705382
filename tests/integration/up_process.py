"""`mesh-llm up` run as a user runs it, through the installed `mesh-llm` executable, with
its output collected and its process tree inspectable by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.support.procs import free_port

MESH_LLM = str(Path(sys.executable).parent / "mesh-llm")  # the venv's console script


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"


def children_of(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def descendants_of(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def still_alive(pids: Iterable[int], within_s: float) -> list[int]:
    """The pids still running after up to `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def pids_mentioning(text: str) -> set[int]:
    """Processes whose command line holds `text` (a test's data directory): what is left
    of a mesh whose launcher is gone."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and text in command_of(int(entry.name)):
            found.add(int(entry.name))
    return found


def holds_model(pid: int) -> bool:
    """Whether the process has a model file mapped: an engine serving one, not the engine
    process each worker keeps started ahead of its next load (warm_engines)."""
    try:
        return ".gguf" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class UpProcess:
    """One `mesh-llm up` on free ports with its own data directory."""

    def __init__(self, data_dir: Path, *args: str, env: Mapping[str, str] | None = None
                 ) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        base = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        self.popen = subprocess.Popen(
            [MESH_LLM, "up", "--port", str(self.port), "--blackboard-port", str(free_port()),
             "--data-dir", str(data_dir), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**base, **(env or {})})
        self._lines: list[str] = []
        self.seen: set[int] = set()  # every pid tree() found, for kill_everything()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, marker: str, timeout_s: float = 300) -> str:
        deadline = time.monotonic() + timeout_s
        while marker not in self.output and time.monotonic() < deadline:
            if self.popen.poll() is not None:
                time.sleep(0.3)  # the last lines may still be in the pipe
                break
            time.sleep(0.2)
        assert marker in self.output, f"no {marker!r} in output:\n{self.output}"
        return self.output

    def tree(self) -> set[int]:
        """Every process `up` started, and theirs (the workers' engines)."""
        found = descendants_of(self.popen.pid)
        self.seen |= found
        return found

    def signal(self, signum: signal.Signals) -> None:
        self.popen.send_signal(signum)

    def kill_everything(self) -> None:
        """Test cleanup: no process of this mesh survives a failed test."""
        pids = self.tree() | self.seen | pids_mentioning(str(self.data_dir))
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
