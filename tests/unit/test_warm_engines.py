"""The engine process the worker starts ahead of need: taken by a load with the same
command and environment, replaced by one with another."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from meshllm.worker.warm_engines import WarmEngines

# A stand-in for the engine: says when it started, then waits for its first command.
ARGV = [sys.executable, "-c",
        "import sys, time; print(time.time(), flush=True); sys.stdin.readline()"]


async def started_at(child: object) -> float:
    return float(await child.read_line())  # type: ignore[attr-defined]


async def test_a_load_takes_the_process_started_ahead_of_it() -> None:
    warm, env = WarmEngines(), dict(os.environ)
    warm.prepare(ARGV, env)
    await asyncio.sleep(0.5)  # it starts while nothing waits on it
    called = time.time()
    first = await warm.start(ARGV, env)
    assert await started_at(first) < called
    called = time.time()
    second = await warm.start(ARGV, env)  # none prepared since: a fresh one
    assert await started_at(second) > called
    warm.prepare(ARGV, env)  # the engine prepares the next once it has loaded
    await asyncio.sleep(0.5)
    called = time.time()
    third = await warm.start(ARGV, env)
    assert await started_at(third) < called
    for child in (first, second, third):
        child.close_stdin()
        assert await child.wait() == 0
    await warm.close()


async def test_another_environment_starts_its_own_process() -> None:
    warm, env = WarmEngines(), dict(os.environ)
    warm.prepare(ARGV, env)
    await asyncio.sleep(0.5)
    called = time.time()
    # (a variable of its own: tests that ran before may have set the kernel switches here)
    other = await warm.start(ARGV, {**env, "MESHLLM_TEST_OTHER_ENGINE": "1"})
    assert await started_at(other) > called  # not the idle one: its environment differs
    other.close_stdin()
    await other.wait()
    await warm.close()
