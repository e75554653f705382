"""The worker's engine supervision with a scripted engine (no llama.cpp)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from meshllm.common.errors import EngineUnavailable
from meshllm.common.types import GenerateEvent, GenerateRequest, LoadState, ModelId, ModelSpec
from meshllm.worker.engines import EngineSettings
from meshllm.worker.hosts import PRIMING, HostDeps, ModelHost
from meshllm.worker.plans import HostPlan, Role
from meshllm.worker.stage import PrimeJob, PrimingFailed, StageServer
from meshllm.worker.stage_cache import Primed

SPEC = ModelSpec(ModelId("gemma3-270m"), "gemma3-270m", 1, 1, 64, 1, "gemma3", 64)
PLAN = HostPlan(SPEC, Role.WHOLE, 0, 1)


def deps() -> HostDeps:
    def no_tunnels(address: str, model: str) -> object:
        raise AssertionError("a whole model needs no tunnel")

    return HostDeps(ScriptedEngine, no_tunnels, StageServer, 1,  # type: ignore[arg-type]
                    "127.0.0.1", Path("/nonexistent"), False, False,
                    restart_backoff_s=0.01)


class ScriptedEngine:
    """Dies when told to; fails to load the first `load_failures` times."""

    instances: list[ScriptedEngine] = []
    load_failures = 0

    def __init__(self, settings: EngineSettings) -> None:
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        ScriptedEngine.instances.append(self)

    async def start(self) -> None:
        if ScriptedEngine.load_failures > 0:
            ScriptedEngine.load_failures -= 1
            raise EngineUnavailable("scripted load failure")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        raise NotImplementedError
        yield

    async def wait_exited(self) -> int:
        return await self.exited

    async def stop(self) -> None:
        if not self.exited.done():
            self.exited.set_result(0)


async def _until(predicate: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_crashed_engine_is_restarted_and_reported() -> None:
    ScriptedEngine.instances.clear()
    states: list[LoadState] = []

    async def on_change() -> None:
        states.append(host.state.state)

    host = ModelHost(PLAN, deps(), on_change)
    host.start()
    await _until(lambda: host.state.state is LoadState.READY)
    ScriptedEngine.instances[0].exited.set_result(134)  # SIGABRT-like death
    await _until(lambda: len(ScriptedEngine.instances) == 2 and
                 host.state.state is LoadState.READY)
    assert host.state.engine_restarts == 1
    changes = [s for i, s in enumerate(states) if i == 0 or states[i - 1] is not s]
    assert changes == [LoadState.LOADING, LoadState.READY, LoadState.LOADING, LoadState.READY]
    await host.stop()


async def test_load_failures_are_reported_then_retried() -> None:
    ScriptedEngine.instances.clear()
    ScriptedEngine.load_failures = 1
    seen: list[str] = []

    async def on_change() -> None:
        seen.append(host.state.error)

    host = ModelHost(PLAN, deps(), on_change)
    host.start()
    await _until(lambda: host.state.state is LoadState.READY)
    assert any("scripted load failure" in error for error in seen)
    await host.stop()


async def test_ready_engine_refuses_while_loading() -> None:
    async def on_change() -> None:
        return None

    host = ModelHost(PLAN, deps(), on_change)
    try:
        host.ready_engine()
        raise AssertionError("expected EngineUnavailable")
    except EngineUnavailable as exc:
        assert "loading" in str(exc)


class QuietStage:
    """A stage server that starts at once and runs until stopped."""

    def __init__(self, settings: object) -> None:
        self.port = 1
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        return None

    async def wait_exited(self) -> int:
        return await self.exited

    async def stop(self) -> None:
        if not self.exited.done():
            self.exited.set_result(0)


async def _stage_with(primer: object, tmp_path: Path) -> tuple[ModelHost, list[str]]:
    phases: list[str] = []

    async def on_change() -> None:
        phases.append(host.state.phase)

    stage_spec = ModelSpec(ModelId("gemma3-270m"), "gemma3-270m", 1, 18, 64, 1, "gemma3", 64)
    deps = HostDeps(ScriptedEngine, lambda a, m: None,  # type: ignore[arg-type,return-value]
                    QuietStage, 1,  # type: ignore[arg-type]
                    "127.0.0.1", tmp_path, False, False, restart_backoff_s=0.01,
                    stage_primer=primer)  # type: ignore[arg-type]
    host = ModelHost(HostPlan(stage_spec, Role.STAGE, 9, 18), deps, on_change)
    host.start()
    await _until(lambda: host.state.state is LoadState.READY)
    return host, phases


async def test_a_stage_primes_its_layers_before_it_serves(tmp_path: Path) -> None:
    jobs: list[PrimeJob] = []

    async def primer(job: PrimeJob, progress: Callable[[float], None]) -> Primed:
        jobs.append(job)
        progress(1.0)
        return Primed(3, 3, 100, 0.01)

    host, phases = await _stage_with(primer, tmp_path)
    assert [(j.layer_start, j.layer_end, j.cache_dir) for j in jobs] == [(9, 18, tmp_path)]
    assert jobs[0].model.name.endswith(".gguf") and PRIMING in phases
    await host.stop()


async def test_a_stage_whose_priming_fails_serves_all_the_same(tmp_path: Path) -> None:
    async def primer(job: PrimeJob, progress: Callable[[float], None]) -> Primed:
        raise PrimingFailed("the priming process exited with code 1")

    host, _ = await _stage_with(primer, tmp_path)  # READY: the head sends the weights
    await host.stop()
