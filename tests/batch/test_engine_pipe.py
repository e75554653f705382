"""Grammars, logprobs, tool turns and the new sampling fields through the engine process
(ProcessEngine <-> engine child), on the real model."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.models import materialize
from meshllm.common.types import (
    ChatMessage,
    Finished,
    GenerateRequest,
    Grammar,
    GrammarKind,
    ModelId,
    RequestId,
    SamplingParams,
    TokenDelta,
    ToolCall,
)
from meshllm.worker.engine_wire import Load
from meshllm.worker.engines import EngineSettings, ProcessEngine

pytestmark = pytest.mark.integration
MODEL = ModelId("gemma3-270m")
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False}


@pytest.fixture
async def engine() -> AsyncIterator[ProcessEngine]:
    eng = ProcessEngine(EngineSettings(Load(materialize("gemma3-270m"), 1024, 2),
                                       dict(os.environ)))
    await eng.start()
    yield eng
    await eng.stop()


async def test_a_constrained_request_with_logprobs_crosses_the_pipe(
        engine: ProcessEngine) -> None:
    chat = (ChatMessage("user", "What is the weather in Paris?"),
            ChatMessage("assistant", "", (ToolCall("call_1", "get_weather",
                                                   '{"city": "Paris"}'),)),
            ChatMessage("tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather"),
            ChatMessage("user", "Is it warm? Answer as JSON."))
    request = GenerateRequest(
        RequestId("r"), MODEL, chat=chat, tools_json=json.dumps([{"type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}}}]),
        sampling=SamplingParams(max_tokens=40, temperature=0.0, min_p=0.05, top_k=40,
                                logit_bias=((0, -100.0),), repeat_penalty=1.1),
        grammar=Grammar(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA)), logprobs=2)
    events = [e async for e in engine.generate(request)]
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    text = "".join(d.text for d in deltas)
    assert json.loads(text)["answer"] in ("yes", "no")
    entries = [lp for d in deltas for lp in d.logprobs]
    assert len(entries) == sum(d.tokens for d in deltas)
    assert "".join(e.token for e in entries) == text
    # A token the grammar forces has no alternative: forbidden tokens are never listed.
    assert all(1 <= len(e.top) <= 2 and e.top[0].token_bytes == e.token_bytes
               for e in entries), entries
    assert any(len(e.top) == 1 for e in entries) and any(len(e.top) == 2 for e in entries)
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "stop"


async def test_an_invalid_grammar_comes_back_as_a_400_error(engine: ProcessEngine) -> None:
    request = GenerateRequest(RequestId("bad"), MODEL, text="Hi",
                              grammar=Grammar(GrammarKind.JSON_SCHEMA, '{"type": "strin"}'))
    with pytest.raises(InvalidGenerateRequest) as info:
        _ = [e async for e in engine.generate(request)]
    assert info.value.param == "response_format" and "strin" in str(info.value)
