"""Children die with the process that started them, whatever kills it: the launcher's
services (`procs.die_with_parent`) and a worker's engine and stage children
(`worker/child.py`)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux's")

# A middle process starts a sleeping grandchild and prints its pid; the test kills the
# middle one outright.
LAUNCHER_LIKE = """
import signal, subprocess, sys, time
from meshllm.cli.procs import die_with_parent
p = subprocess.Popen(["sleep", "60"], start_new_session=True,
                     preexec_fn=die_with_parent(signal.SIGTERM))
print(p.pid, flush=True)
time.sleep(60)
"""
WORKER_LIKE = """
import asyncio, os, sys
from meshllm.worker.child import ChildProcess
async def main():
    child = await ChildProcess.start(["sleep", "60"], dict(os.environ), pipes=False)
    print(child.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


@pytest.mark.parametrize("code", [LAUNCHER_LIKE, WORKER_LIKE], ids=["launcher", "worker"])
def test_a_child_dies_when_its_parent_is_killed(code: str) -> None:
    middle = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert middle.stdout is not None
    grandchild = int(middle.stdout.readline())
    deadline = time.monotonic() + 5
    while _comm(grandchild) != "sleep" and time.monotonic() < deadline:
        time.sleep(0.02)  # the worker's child is a small interpreter until it execs
    assert _alive(grandchild)
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
