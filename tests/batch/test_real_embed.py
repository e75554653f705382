"""Embeddings through the engine process (ProcessEngine <-> engine child) on the real
model: unit vectors of the model's width, deterministic, the same whether an input is sent
alone or in a batch (up to llama.cpp's kernels, which differ across batch sizes), token ids
checked, generation unharmed by an embedding context beside it, and an idle context freed
and made again."""

from __future__ import annotations

import asyncio
import math
import os
import queue
import time
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
from meshllm.worker.engine.batch import BatchConfig, BatchEngine
from meshllm.worker.engine.batch.embed import EmbedResult
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


def test_an_idle_embedding_context_freed_by_the_engine_is_made_anew() -> None:
    """The engine frees an embedding context left idle; the next request must get a new
    one, not the freed one (which crashed the engine process with SIGSEGV)."""
    cfg = BatchConfig(model_path=str(materialize("gemma3-270m")), n_ctx=1024, n_slots=1,
                      n_threads=2, embed_idle_s=0.05)
    eng, results = BatchEngine(cfg), queue.Queue[object]()
    eng.start()
    try:
        vectors = []
        for rid in ("before", "after"):
            eng.submit_embed(rid, [TEXTS[1]], results.put)
            result = results.get(timeout=60)
            assert isinstance(result, EmbedResult), result
            vectors.append(result.vectors)
            deadline = time.monotonic() + 10  # let the engine free the idle context
            while eng.embedding_context_held() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not eng.embedding_context_held()
    finally:
        eng.stop()
    assert vectors[0] == vectors[1]
