"""The split's round trip crosses the engine pipe (ProcessEngine <-> engine child, the real
model): in the Load command, then live as a SetLinkRtt control message, without a reload;
the engine's Stats report what its draft tuner uses."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from meshllm.common.models import materialize
from meshllm.common.types import Finished, GenerateRequest, ModelId, RequestId, SamplingParams
from meshllm.worker.engine_wire import Load
from meshllm.worker.engines import EngineSettings, ProcessEngine

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine() -> AsyncIterator[ProcessEngine]:
    eng = ProcessEngine(EngineSettings(
        Load(materialize("gemma3-270m"), 512, 1, speculative="ngram", link_rtt_s=0.01),
        dict(os.environ)))
    await eng.start()
    yield eng
    await eng.stop()


async def _reported(engine: ProcessEngine, rtt_us: int, steps: int = 0,
                    timeout_s: float = 10.0) -> None:
    """Waits for a Stats event (one a second at most) with this round trip, once the
    engine has made at least `steps` steps."""
    async with asyncio.timeout(timeout_s):
        while engine.stats.link_rtt_us != rtt_us or engine.stats.steps < steps:
            await asyncio.sleep(0.05)


async def test_a_running_engine_takes_a_new_round_trip(engine: ProcessEngine) -> None:
    await _reported(engine, 10_000)  # from the Load command
    engine.set_link_rtt(0.045)
    await _reported(engine, 45_000)
    request = GenerateRequest(RequestId("r"), ModelId("gemma3-270m"), text="one two one two",
                              sampling=SamplingParams(max_tokens=8, temperature=0.0))
    events = [e async for e in engine.generate(request)]  # the same process serves on
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 8
    await _reported(engine, 45_000, steps=1)  # and the steps kept it
