"""Worker.apply when capacity follows demand, over scripted engines: a retired replica
drains (its streams finish) and then unloads, a resumed one serves again, a new model waits
for the memory a draining one frees, and slot use is published without a write per request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from grpc_health.v1 import health
from meshllm.common import convert
from meshllm.common.errors import ConfigError
from meshllm.common.membership import Registration
from meshllm.common.types import (
    Finished,
    GenerateEvent,
    GenerateRequest,
    LoadState,
    ModelId,
    ModelSpec,
    RequestId,
    SamplingParams,
    TokenDelta,
    Usage,
    WorkerInfo,
)
from meshllm.v1 import mesh_pb2
from meshllm.worker import engine_wire as wire
from meshllm.worker.config import WorkerConfig, load_config
from meshllm.worker.engine_wire import EngineStats
from meshllm.worker.engines import EngineSettings, finished_event
from meshllm.worker.hosts import HostDeps
from meshllm.worker.links import LinkMonitor
from meshllm.worker.plans import HostPlan, Role
from meshllm.worker.service import Worker
from meshllm.worker.stage import StageServer

GiB = 1024**3
A, B = ModelId("a"), ModelId("b")


class HeldEngine:
    """Streams one token, then finishes when the test releases the request."""

    started: list[HeldEngine] = []

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.release = asyncio.Event()
        self.stopped = False
        self.stats = EngineStats()
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        HeldEngine.started.append(self)

    async def start(self) -> None: ...

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        yield TokenDelta("hi", 1)
        await self.release.wait()
        yield Finished("stop", Usage(1, 2))

    async def wait_exited(self) -> int:
        return await self._exited

    async def stop(self) -> None:
        self.stopped = True
        if not self._exited.done():
            self._exited.set_result(0)


class Records:
    """A Registration that keeps what was published."""

    def __init__(self) -> None:
        self.published: list[WorkerInfo] = []

    async def publish(self, value: bytes) -> bool:
        self.published.append(convert.worker_from_pb(mesh_pb2.WorkerRecord.FromString(value)))
        return True


def make_worker(tmp_path: Path, budget: int = 8 * GiB, grace_s: float = 0.2,
                timeout_s: float = 600.0, load_publish_s: float = 1.0
                ) -> tuple[Worker, Records]:
    config = SimpleNamespace(
        worker_id="w1", advertise_address="127.0.0.1:1", backend="cpu",
        memory_budget_bytes=budget, threads=1, drain_grace_s=grace_s,
        drain_timeout_s=timeout_s, load_publish_s=load_publish_s)

    def no_tunnels(*args: object) -> Any:
        raise AssertionError("whole models need no tunnel")

    deps = HostDeps(HeldEngine, no_tunnels, StageServer, 1,  # type: ignore[arg-type]
                    "127.0.0.1", tmp_path, False, False, restart_backoff_s=0.01)
    records = Records()
    worker = Worker(cast(WorkerConfig, config), cast(Registration, records),
                    health.aio.HealthServicer(), deps,
                    cast(LinkMonitor, SimpleNamespace(published={})))
    return worker, records


def plan(tmp_path: Path, model: ModelId, required: int = GiB, role: Role = Role.WHOLE,
         retiring: bool = False) -> HostPlan:
    source = tmp_path / f"{model}.gguf"
    source.write_bytes(b"GGUF")
    spec = ModelSpec(model, str(source), 1, 4, 64, 1, "gemma3", 64, slots=2)
    return HostPlan(spec, role, 0, 4, retiring=retiring, required_bytes=required)


async def until(predicate: Callable[[], object], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def ready(worker: Worker, model: ModelId) -> Callable[[], bool]:
    return lambda: model in worker.hosts and worker.hosts[model].state.state is LoadState.READY


def request(model: ModelId, n: int = 1) -> GenerateRequest:
    return GenerateRequest(RequestId(f"r{n}"), model, "hello", None, SamplingParams())


@contextlib.asynccontextmanager
async def streaming(worker: Worker, model: ModelId, n: int = 1
                    ) -> AsyncIterator[list[GenerateEvent]]:
    """A request to `model` that has had its first token; its events so far, then all."""
    events: list[GenerateEvent] = []

    async def consume() -> None:
        async for event in worker.generate(request(model, n)):
            events.append(event)

    task = asyncio.create_task(consume())
    await until(lambda: events)
    try:
        yield events
        await asyncio.wait_for(task, 5)
    finally:
        task.cancel()


def models_in(record: WorkerInfo) -> dict[str, tuple[LoadState, bool, str]]:
    return {m.model_id: (m.state, m.draining, m.phase) for m in record.models}


@pytest.fixture(autouse=True)
def fresh_engines() -> None:
    HeldEngine.started.clear()


async def test_a_retired_model_finishes_its_stream_then_unloads(tmp_path: Path) -> None:
    worker, records = make_worker(tmp_path)
    live = plan(tmp_path, A)
    await worker.apply({A: live})
    await until(ready(worker, A))
    engine = HeldEngine.started[0]
    async with streaming(worker, A) as events:
        await worker.apply({A: replace(live, retiring=True)})
        assert models_in(records.published[-1])[A] == (LoadState.READY, True, "")
        assert worker.metrics.registry.get_sample_value(
            "meshllm_worker_model_draining", {"model": A}) == 1
        await asyncio.sleep(0.5)   # past the grace: a running stream holds it
        assert A in worker.hosts and not engine.stopped
        async with streaming(worker, A, 2) as late:  # the gateway's view lagged
            engine.release.set()
        assert late[-1] == Finished("stop", Usage(1, 2))
    assert events[-1] == Finished("stop", Usage(1, 2))
    await until(lambda: A not in worker.hosts)
    assert engine.stopped and len(HeldEngine.started) == 1  # drained, never restarted
    assert A not in models_in(records.published[-1])
    await worker.close()


async def test_a_model_gone_from_the_placement_mid_stream_drains_an_idle_one_goes_now(
        tmp_path: Path) -> None:
    worker, _ = make_worker(tmp_path)
    await worker.apply({A: plan(tmp_path, A), B: plan(tmp_path, B)})
    await until(lambda: ready(worker, A)() and ready(worker, B)())
    engine_a = next(e for e in HeldEngine.started if "a.gguf" in str(e.settings.load.model_path))
    async with streaming(worker, A) as events:
        await worker.apply({})
        assert list(worker.hosts) == [A] and worker.hosts[A].draining
        engine_a.release.set()
    assert events[-1] == Finished("stop", Usage(1, 2))
    await until(lambda: not worker.hosts)
    await worker.close()


async def test_a_stage_of_a_retired_replica_stays_until_the_replica_leaves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, _ = make_worker(tmp_path)
    stage = plan(tmp_path, A, role=Role.STAGE)
    stopped: list[ModelId] = []

    async def fake_stop(self: Any) -> None:
        stopped.append(self.spec.model_id)

    monkeypatch.setattr("meshllm.worker.hosts.ModelHost.start", lambda self: setattr(
        self, "_task", asyncio.get_running_loop().create_future()))
    monkeypatch.setattr("meshllm.worker.hosts.ModelHost.stop", fake_stop)
    await worker.apply({A: stage})
    await worker.apply({A: replace(stage, retiring=True)})
    await asyncio.sleep(0.5)   # well past the grace: its head's streams are not counted here
    assert worker.hosts[A].draining and not stopped
    await worker.apply({})     # the head unloaded and the planner dropped the replica
    assert not worker.hosts and stopped == [A]
    await worker.close()


async def test_a_retired_model_brought_back_serves_again(tmp_path: Path) -> None:
    worker, records = make_worker(tmp_path, grace_s=0.3)
    live = plan(tmp_path, A)
    await worker.apply({A: live})
    await until(ready(worker, A))
    await worker.apply({A: replace(live, retiring=True)})
    await worker.apply({A: live})
    assert models_in(records.published[-1])[A] == (LoadState.READY, False, "")
    await asyncio.sleep(0.6)
    assert A in worker.hosts and not worker.hosts[A].draining
    assert len(HeldEngine.started) == 1 and not HeldEngine.started[0].stopped
    await worker.close()


async def test_a_drain_that_times_out_cuts_its_streams(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    worker, _ = make_worker(tmp_path, grace_s=0.1, timeout_s=0.3)
    live = plan(tmp_path, A)
    await worker.apply({A: live})
    await until(ready(worker, A))
    events: list[GenerateEvent] = []

    async def consume() -> None:
        async for event in worker.generate(request(A)):
            events.append(event)

    task = asyncio.create_task(consume())
    await until(lambda: events)
    await worker.apply({A: replace(live, retiring=True)})
    await until(lambda: A not in worker.hosts)
    assert "cuts 1 streams" in caplog.text
    assert worker.metrics.registry.get_sample_value(
        "meshllm_worker_drain_cut_streams_total", {"model": A}) == 1
    task.cancel()
    await worker.close()


async def test_a_new_model_waits_for_the_memory_a_draining_one_frees(tmp_path: Path) -> None:
    worker, records = make_worker(tmp_path, budget=8 * GiB)
    old, new = plan(tmp_path, A, 5 * GiB), plan(tmp_path, B, 4 * GiB)
    await worker.apply({A: old})
    await until(ready(worker, A))
    async with streaming(worker, A):
        await worker.apply({A: replace(old, retiring=True), B: new})
        assert models_in(records.published[-1])[B] == (
            LoadState.LOADING, False, "waiting for memory: draining a")
        assert len(HeldEngine.started) == 1 and not worker.hosts[B].started
        HeldEngine.started[0].release.set()
    await until(ready(worker, B))
    assert A not in worker.hosts and HeldEngine.started[0].stopped
    await worker.close()


async def test_slot_use_is_published_at_most_once_a_period_and_when_it_settles(
        tmp_path: Path) -> None:
    worker, records = make_worker(tmp_path, load_publish_s=0.3)
    await worker.apply({A: plan(tmp_path, A)})
    await until(ready(worker, A))
    await asyncio.sleep(0.1)
    before = len(records.published)
    engine = HeldEngine.started[0]
    streams = [asyncio.create_task(_drain(worker.generate(request(A, n)))) for n in range(3)]
    await until(lambda: worker.hosts[A].in_flight == 3)
    await asyncio.sleep(0.05)
    assert len(records.published) - before == 1   # the first change, at once
    await asyncio.sleep(0.4)
    state = records.published[-1].models[0]
    assert (state.running, state.queued, state.slots) == (2, 1, 2)
    engine.release.set()
    await asyncio.gather(*streams)
    await asyncio.sleep(0.4)
    state = records.published[-1].models[0]
    assert (state.running, state.queued) == (0, 0)
    assert len(records.published) - before <= 3   # 6 load changes, 3 writes at most
    await worker.close()


async def _drain(events: AsyncIterator[GenerateEvent]) -> None:
    async for _ in events:
        pass


# --- how long a generation queued and was served, from the engine's wire times ---

@pytest.mark.parametrize(("started_ns", "ended_ns", "queued_s", "service_s"), [
    (1_500_000_000, 4_000_000_000, 0.5, 2.5),
    (0, 3_000_000_000, 0.0, 2.0),              # no start reported: it did not queue
    (900_000_000, 800_000_000, 0.0, 0.0),      # clocks that disagree never go negative
], ids=["queued then served", "no start reported", "clock skew"])
def test_finished_carries_queue_and_service_time(started_ns: int, ended_ns: int,
                                                 queued_s: float, service_s: float) -> None:
    wire_finished = wire.Finished(RequestId("r"), "stop", Usage(1, 2), started_ns, 0)
    finished = finished_event(wire_finished, 1_000_000_000, ended_ns)
    assert finished == Finished("stop", Usage(1, 2), queued_s, service_s)


# --- the settings ---

def test_drain_and_publish_settings_have_defaults_and_bad_values_name_their_key() -> None:
    cfg = load_config([], {"MESHLLM_WORKER_MEMORY": "1GiB"})
    assert (cfg.drain_grace_s, cfg.drain_timeout_s, cfg.load_publish_s) == (2.0, 600.0, 1.0)
    cfg = load_config(["--drain-grace-s", "0.5"], {"MESHLLM_WORKER_MEMORY": "1GiB",
                                                   "MESHLLM_DRAIN_TIMEOUT_S": "30"})
    assert (cfg.drain_grace_s, cfg.drain_timeout_s) == (0.5, 30.0)
    for argv, key in ((["--drain-grace-s", "0"], "--drain-grace-s"),
                      (["--drain-timeout-s", "soon"], "--drain-timeout-s"),
                      (["--load-publish-s", "-1"], "--load-publish-s")):
        with pytest.raises(ConfigError) as info:
            load_config([*argv, "--worker-memory", "1GiB"], {})
        assert key in info.value.key


async def test_a_model_waiting_for_memory_that_is_retired_never_loads(tmp_path: Path) -> None:
    worker, _ = make_worker(tmp_path, budget=8 * GiB)
    old, new = plan(tmp_path, A, 5 * GiB), plan(tmp_path, B, 4 * GiB)
    await worker.apply({A: old})
    await until(ready(worker, A))
    async with streaming(worker, A):
        await worker.apply({A: replace(old, retiring=True), B: new})
        await worker.apply({A: replace(old, retiring=True), B: replace(new, retiring=True)})
        assert B not in worker.hosts
        HeldEngine.started[0].release.set()
    await until(lambda: not worker.hosts)
    assert len(HeldEngine.started) == 1
    await worker.close()
