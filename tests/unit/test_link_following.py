"""A split head hands its engine the measured round trip of a step: in the Load command, and
live (a control message, no reload) when the link monitor's measurements change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from meshllm.common.errors import EngineCrashed
from meshllm.common.types import (
    GenerateEvent,
    GenerateRequest,
    LoadState,
    ModelId,
    ModelSpec,
    WorkerId,
)
from meshllm.worker.engines import EngineSettings
from meshllm.worker.hosts import HostDeps, ModelHost
from meshllm.worker.plans import HostPlan, Role, StagePeer
from meshllm.worker.stage import StageServer

SPEC = ModelSpec(ModelId("gemma3-270m"), "gemma3-270m", 1, 18, 64, 1, "gemma3", 64)
PEERS = (StagePeer(WorkerId("w2"), "w2:50051", "", 9, 14),
         StagePeer(WorkerId("w3"), "w3:50051", "", 14, 18))
HEAD = HostPlan(SPEC, Role.HEAD, 0, 9, PEERS)
WHOLE = HostPlan(SPEC, Role.WHOLE, 0, 18)
STAGE = HostPlan(SPEC, Role.STAGE, 9, 18)


class LinkEngine:
    """Records its Load command and every round trip it is sent afterwards."""

    instances: list[LinkEngine] = []
    dead = False

    def __init__(self, settings: EngineSettings) -> None:
        self.load = settings.load
        self.sent: list[float] = []
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        LinkEngine.instances.append(self)

    async def start(self) -> None:
        return None

    def set_link_rtt(self, rtt_s: float) -> None:
        if LinkEngine.dead:
            raise EngineCrashed("the engine process is not running")
        self.sent.append(rtt_s)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        raise NotImplementedError
        yield

    async def wait_exited(self) -> int:
        return await self.exited

    async def stop(self) -> None:
        if not self.exited.done():
            self.exited.set_result(0)


class Tunnel:
    async def start(self) -> str:
        return "127.0.0.1:1"

    async def close(self) -> None:
        return None


def deps() -> HostDeps:
    return HostDeps(LinkEngine, lambda address, model: Tunnel(),  # type: ignore[arg-type]
                    StageServer, 1, "127.0.0.1", Path("/nonexistent"), False, False,
                    restart_backoff_s=0.01)


async def _nothing() -> None:
    return None


@pytest.mark.parametrize(("plan", "measured", "expected_s"), [
    (HEAD, {"w2": 12.0, "w3": 8.0}, 0.020),   # a star: the stages' round trips add up
    (HEAD, {"w2": 12.0}, 0.024),              # w3 not measured yet: as slow as w2
    (HEAD, {}, 0.0),
    (HEAD, {"w2": 12.0, "w3": 8.0, "w9": 300.0}, 0.020),  # other peers do not count
    (WHOLE, {"w2": 12.0}, 0.0),               # a whole model waits on no link
    (STAGE, {"w2": 12.0}, 0.0),               # nor does a stage: its head drafts
])
def test_a_steps_round_trip(plan: HostPlan, measured: dict[str, float],
                            expected_s: float) -> None:
    host = ModelHost(plan, deps(), _nothing, lambda: measured)
    assert host.link_rtt_s() == pytest.approx(expected_s)


async def test_the_head_loads_with_the_round_trip_and_follows_it_live() -> None:
    LinkEngine.instances.clear()
    measured = {"w2": 12.0, "w3": 8.0}
    host = ModelHost(HEAD, deps(), _nothing, lambda: measured)
    host.start()
    async with asyncio.timeout(30):
        while host.state.state is not LoadState.READY:
            await asyncio.sleep(0.01)
    engine = LinkEngine.instances[0]
    assert engine.load.link_rtt_s == pytest.approx(0.020)
    host.follow_links()  # nothing changed: nothing sent
    measured["w3"] = 48.0
    host.follow_links()
    host.follow_links()  # sent once per change
    assert engine.sent == [pytest.approx(0.060)]
    LinkEngine.dead = True  # a dead engine is not told; its successor loads with the value
    measured["w2"] = 2.0
    host.follow_links()
    LinkEngine.dead = False
    assert engine.sent == [pytest.approx(0.060)]
    host.follow_links()  # alive again (a restart would load with it): told now
    assert engine.sent == [pytest.approx(0.060), pytest.approx(0.050)]
    await host.stop()
