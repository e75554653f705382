"""A service told to stop while it is still starting (etcd not there yet) stops at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshllm.common import lifecycle

UNREACHABLE_ETCD = "http://127.0.0.1:1"  # nothing listens on port 1: connect keeps waiting
SERVICES = ("blackboard", "gateway", "planner", "worker")


async def test_a_step_that_ends_gives_its_result() -> None:
    stop = asyncio.Event()
    assert await lifecycle.unless_stopped(stop, asyncio.sleep(0, result=42)) == 42


async def test_stop_abandons_a_step_and_cancels_it() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    asyncio.get_running_loop().call_soon(stop.set)
    with pytest.raises(lifecycle.Stopped):
        await lifecycle.unless_stopped(stop, forever())
    assert cancelled.is_set()


async def test_a_failing_step_raises_its_own_error() -> None:
    async def fails() -> None:
        raise ValueError("etcd said no")

    with pytest.raises(ValueError, match="etcd said no"):
        await lifecycle.unless_stopped(asyncio.Event(), fails())


def wait_for_line(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {log.name} after {timeout_s:.0f}s:\n{log.read_text()}")


@pytest.mark.parametrize("service", SERVICES)
def test_sigterm_while_waiting_for_etcd_exits_cleanly(service: str, tmp_path: Path) -> None:
    log = tmp_path / f"{service}.log"
    extra = ("--data-dir", str(tmp_path / "data")) if service == "blackboard" else ()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"meshllm.{service}", "--etcd", UNREACHABLE_ETCD,
             "--listen", "127.0.0.1:0", *extra], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log, "waiting for etcd", 60)
        proc.send_signal(signal.SIGTERM)
        # connect() alone would keep waiting 30 s for etcd and then fail with status 2
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped while starting" in log.read_text()
