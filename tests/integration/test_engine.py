"""The engine process on the real model, driven directly."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from meshllm.common.errors import EngineUnavailable, MeshError, PromptTooLong
from meshllm.common.models import materialize
from meshllm.common.types import GenerateRequest, ModelId, RequestId, SamplingParams, TokenDelta
from meshllm.worker.engine_wire import EngineStats, Load
from meshllm.worker.engines import EngineSettings, ProcessEngine

pytestmark = pytest.mark.integration


async def test_load_reports_progress_and_generates() -> None:
    seen: list[float] = []
    engine = ProcessEngine(EngineSettings(Load(materialize("gemma3-270m"), 512, 1),
                                          dict(os.environ), on_progress=seen.append))
    await engine.start()
    try:
        assert seen and seen[-1] == 1.0
        assert seen == sorted(seen)
        request = GenerateRequest(RequestId("r"), ModelId("gemma3-270m"), text="Hello",
                                  sampling=SamplingParams(max_tokens=3, temperature=0))
        events = [e async for e in engine.generate(request)]
        assert sum(e.tokens for e in events if isinstance(e, TokenDelta)) == 3
    finally:
        await engine.stop()


async def test_typed_errors_and_stats_cross_the_pipe() -> None:
    engine = ProcessEngine(EngineSettings(Load(materialize("gemma3-270m"), 64, 1),
                                          dict(os.environ)))
    await engine.start()
    try:
        too_long = GenerateRequest(RequestId("long"), ModelId("gemma3-270m"),
                                   text="word " * 200, sampling=SamplingParams(max_tokens=1))
        with pytest.raises(PromptTooLong) as info:
            _ = [e async for e in engine.generate(too_long)]
        assert info.value.context_length == 64 and info.value.prompt_tokens > 64
        request = GenerateRequest(RequestId("r"), ModelId("gemma3-270m"), text="Hello",
                                  sampling=SamplingParams(max_tokens=4, temperature=0))
        _ = [e async for e in engine.generate(request)]
        async with asyncio.timeout(5):  # the engine reports about once a second
            while engine.stats.generated_tokens < 4:
                await asyncio.sleep(0.05)
        assert isinstance(engine.stats, EngineStats) and engine.stats.n_slots == 1
    finally:
        await engine.stop()


async def test_a_failed_load_is_reported_with_its_cause(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    engine = ProcessEngine(EngineSettings(Load(broken, 64, 1), dict(os.environ)))
    with pytest.raises(EngineUnavailable, match=r"loading broken\.gguf failed") as info:
        await engine.start()
    assert isinstance(info.value.__cause__, MeshError)
    assert await engine.wait_exited() == 1
