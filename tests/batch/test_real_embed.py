"""Embeddings through the engine process (ProcessEngine <-> engine child) on the real
model: unit vectors of the model's width, deterministic, the same whether an input is sent
alone or in a batch (up to llama.cpp's kernels, which differ across batch sizes), token ids
checked, and generation unharmed by an embedding context beside it."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator

import pytest
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.models import materialize
from meshllm.common.types import (
    EmbedRequest,
    Finished,
    GenerateRequest,
    ModelId,
    RequestId,
    SamplingParams,
    TokenDelta,
)
from meshllm.worker.engine_wire import Load
from meshllm.worker.engines import EngineSettings, ProcessEngine

pytestmark = pytest.mark.integration
MODEL = ModelId("gemma3-270m")
TEXTS = ("The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "def add(a, b): return a + b")
GEMMA3_270M_WIDTH = 640
GEMMA3_270M_VOCAB = 262144


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[ProcessEngine]:
    eng = ProcessEngine(EngineSettings(Load(materialize("gemma3-270m"), 1024, 2),
                                       dict(os.environ)))
    await eng.start()
    yield eng
    await eng.stop()


def cosine(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))  # both unit length


async def embed(engine: ProcessEngine, rid: str, *inputs: str | tuple[int, ...]
                ) -> tuple[tuple[float, ...], ...]:
    result = await engine.embed(EmbedRequest(RequestId(rid), MODEL, inputs))
    assert len(result.vectors) == len(inputs)
    return result.vectors


async def greedy(engine: ProcessEngine, rid: str) -> str:
    request = GenerateRequest(RequestId(rid), MODEL, text="The capital of France is",
                              sampling=SamplingParams(max_tokens=16, temperature=0.0))
    events = [e async for e in engine.generate(request)]
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


async def test_vectors_are_unit_length_deterministic_and_batch_independent(
        engine: ProcessEngine) -> None:
    result = await engine.embed(EmbedRequest(RequestId("a"), MODEL, TEXTS))
    assert result.prompt_tokens > len(TEXTS)
    for v in result.vectors:
        assert len(v) == GEMMA3_270M_WIDTH
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5)
    again = await embed(engine, "b", *TEXTS)
    assert again == result.vectors  # same batch, same kernels: the same bits
    alone = await embed(engine, "c", TEXTS[1])
    assert cosine(alone[0], result.vectors[1]) > 0.999
    assert alone == await embed(engine, "d", TEXTS[1])


async def test_token_ids_are_checked_against_the_vocabulary(engine: ProcessEngine) -> None:
    with pytest.raises(InvalidGenerateRequest, match="token id 262144") as info:
        await embed(engine, "e", (2, 100), (2, GEMMA3_270M_VOCAB))
    assert info.value.param == "input"
    with pytest.raises(InvalidGenerateRequest, match="embeds at most 512"):
        await embed(engine, "f", tuple([100] * 600))


async def test_generation_is_unchanged_by_embeddings_beside_it(engine: ProcessEngine) -> None:
    before = await greedy(engine, "g1")
    many = tuple(f"sentence number {i} about nothing much" for i in range(80))
    during, vectors = await asyncio.gather(greedy(engine, "g2"), embed(engine, "h", *many))
    assert len(vectors) == 80
    assert during == before == await greedy(engine, "g3")
