"""Child processes of a local mesh: started with logs under the data directory, stopped
in reverse order with SIGTERM, then SIGKILL for any that do not exit in time.

What a child inherits from `mesh-llm up`'s environment: every mesh-wide setting (etcd, TLS,
log level, the OTEL_* tracing variables, PATH, HOME, ...), but no variable of a per-process
option (listen and advertise addresses, metrics port, ids, data and cache directories): set
once for `up`, those would reach every service and collide; `up` passes each child its own
as flags instead (`child_environment`).

Children run in sessions of their own (a Ctrl-C reaches only `up`, which stops them in
order), so nothing would stop them if `up` died without stopping them (SIGKILL, a crash):
on Linux each child asks the kernel for SIGTERM when `up` dies (`die_with_parent`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from meshllm.cli.output import say
from meshllm.common.config import Option

STOP_GRACE_S = 10.0
# Set for every child whatever up's environment says: logs flushed line by line, and no gdb
# attached by ggml to an aborting process (slow, and useless here).
CHILD_SETTINGS = {"PYTHONUNBUFFERED": "1", "GGML_NO_BACKTRACE": "1"}
# Per process, though no option declares them: each service names its own traces.
PER_PROCESS_VARIABLES = frozenset({"OTEL_SERVICE_NAME"})


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `signum` to the child when the thread that
    forked it exits (so fork from a thread that lives as long as the process: the main
    thread). None where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nothing would tell us
            os._exit(1)
    return preexec


def child_environment(parent: Mapping[str, str], options: Iterable[Option]) -> dict[str, str]:
    """The environment a child of `up` starts with: `parent` (up's own) less the variables
    of the per-process `options`, plus CHILD_SETTINGS."""
    dropped = {opt.env for opt in options if opt.per_process} | PER_PROCESS_VARIABLES
    kept = {name: value for name, value in parent.items() if name not in dropped}
    return {**kept, **CHILD_SETTINGS}


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
    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env  # what every child starts with (see child_environment)
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
                preexec_fn=die_with_parent(signal.SIGTERM),  # and if we die, they stop too
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
                say(f"  {child.name} did not stop in {STOP_GRACE_S:.0f}s: killing it",
                    sys.stderr)
                os.killpg(child.popen.pid, signal.SIGKILL)
                child.popen.wait()


def service_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
