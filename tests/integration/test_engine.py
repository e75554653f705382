"""The engine process on the real model, driven directly."""

from __future__ import annotations

from meshllm.common.models import materialize
from meshllm.common.types import GenerateRequest, ModelId, RequestId, SamplingParams, TokenDelta
from meshllm.worker.engine import EngineSettings, ProcessEngine


async def test_load_reports_progress_and_generates() -> None:
    seen: list[float] = []
    engine = ProcessEngine(EngineSettings(materialize("gemma3-270m"), 512, 1,
                                          on_progress=seen.append))
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
