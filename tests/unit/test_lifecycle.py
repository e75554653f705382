"""Supervision of background tasks: restarted with growing, capped delays; stopped by
cancellation; every failure counted."""

from __future__ import annotations

import asyncio
import logging

import pytest
from meshllm.common import lifecycle
from meshllm.common.lifecycle import Backoff
from prometheus_client import CollectorRegistry


def restarts_of(registry: CollectorRegistry, service: str, task: str) -> float:
    value = registry.get_sample_value(f"meshllm_{service}_task_restarts_total", {"task": task})
    return value or 0.0


@pytest.mark.parametrize(("backoff", "expected"), [
    (Backoff(0.5, 30.0), [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
    (Backoff(0.2, 2.0), [0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0]),
    (Backoff(1.0, 10.0, factor=3.0), [1.0, 3.0, 9.0, 10.0, 10.0, 10.0, 10.0, 10.0]),
    (Backoff(5.0, 1.0), [1.0] * 8),  # the cap wins over a larger first delay
])
def test_backoff_grows_and_is_capped(backoff: Backoff, expected: list[float]) -> None:
    assert [pytest.approx(backoff.next()) for _ in expected] == expected


def test_backoff_reset_starts_again() -> None:
    backoff = Backoff(0.5, 30.0)
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.next() == 0.5


async def test_a_task_that_fails_twice_then_runs(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    restarts = lifecycle.restart_counter("test", registry)
    runs: list[int] = []
    running = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) <= 2:
            raise RuntimeError(f"failure {len(runs)}")
        running.set()
        await asyncio.Event().wait()  # runs until cancelled

    with caplog.at_level(logging.ERROR, logger="meshllm.common.lifecycle"):
        task = asyncio.create_task(lifecycle.supervise(
            "flaky", flaky, restarts, Backoff(0.01, 0.02)))
        await asyncio.wait_for(running.wait(), 5)
    assert len(runs) == 3
    assert restarts_of(registry, "test", "flaky") == 2
    failures = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info is not None for r in failures)  # the traceback, not just a line
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancellation_stops_it_without_a_restart() -> None:
    registry = CollectorRegistry()
    restarts = lifecycle.restart_counter("test", registry)
    started = asyncio.Event()
    runs = 0

    async def forever() -> None:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(lifecycle.supervise("forever", forever, restarts))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runs == 1
    assert restarts_of(registry, "test", "forever") == 0


async def test_cancellation_during_the_backoff_stops_it() -> None:
    registry = CollectorRegistry()
    restarts = lifecycle.restart_counter("test", registry)
    failed = asyncio.Event()

    async def failing() -> None:
        failed.set()
        raise RuntimeError("always")

    task = asyncio.create_task(lifecycle.supervise(
        "failing", failing, restarts, Backoff(60.0, 60.0)))
    await asyncio.wait_for(failed.wait(), 5)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert restarts_of(registry, "test", "failing") == 1


async def test_the_delays_between_restarts_grow_and_are_capped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    restarts = lifecycle.restart_counter("test", registry)
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("meshllm.common.lifecycle.asyncio.sleep", recorded_sleep)
    runs = 0

    async def fails_six_times() -> None:
        nonlocal runs
        runs += 1
        if runs <= 6:
            raise RuntimeError("not yet")

    await lifecycle.supervise("six", fails_six_times, restarts, Backoff(1.0, 8.0))
    assert slept == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert restarts_of(registry, "test", "six") == 6


async def test_a_long_healthy_run_resets_the_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    restarts = lifecycle.restart_counter("test", registry)
    slept: list[float] = []
    real_sleep = asyncio.sleep
    loop = asyncio.get_running_loop()
    clock = [0.0]
    monkeypatch.setattr(loop, "time", lambda: clock[0])

    async def recorded_sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("meshllm.common.lifecycle.asyncio.sleep", recorded_sleep)
    run_lengths_s = [0.0, 0.0, 0.0, 120.0, 0.0]  # the fourth run was healthy for 2 min

    async def task() -> None:
        length = run_lengths_s.pop(0)
        clock[0] += length
        if run_lengths_s:
            raise RuntimeError("again")

    await lifecycle.supervise("reset", task, restarts, Backoff(1.0, 30.0), healthy_after_s=60)
    assert slept == [1.0, 2.0, 4.0, 1.0]


async def test_a_normal_return_ends_supervision() -> None:
    restarts = lifecycle.restart_counter("test", CollectorRegistry())
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    await lifecycle.supervise("once", once, restarts)
    assert runs == 1
