"""Embeddings in the batching engine, on a scripted model: how inputs are packed into
decodes, that a long list goes one chunk per step beside generation, and the refusals."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from meshllm.common.errors import InvalidGenerateRequest, MeshError
from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, QueueFull
from meshllm.worker.engine.batch.embed import (
    EmbedResult,
    check_inputs,
    next_chunk,
    normalised,
)
from meshllm.worker.engine.batch.load_options import LoadOptions

from .collect import Collector
from .scripted import ScriptedBackend


@pytest.mark.parametrize(("lengths", "max_tokens", "max_seqs", "chunks"), [
    ([3], 8, 4, [range(0, 1)]),
    ([3, 5], 8, 4, [range(0, 2)]),          # exactly full
    ([3, 6], 8, 4, [range(0, 1), range(1, 2)]),
    ([1, 1, 1, 1, 1], 8, 2, [range(0, 2), range(2, 4), range(4, 5)]),  # sequence limit
    ([8, 1, 8], 8, 4, [range(0, 1), range(1, 2), range(2, 3)]),
    ([2, 2, 2, 2, 7], 8, 64, [range(0, 4), range(4, 5)]),
    ([6, 1, 1], 4, 4, [range(0, 1), range(1, 3)]),  # one input over the budget goes alone
], ids=["one", "full", "overflow", "seq limit", "each full", "tail", "over budget"])
def test_inputs_are_packed_in_order_within_a_decodes_limits(
        lengths: list[int], max_tokens: int, max_seqs: int, chunks: list[range]) -> None:
    planned, start = [], 0
    while start < len(lengths):
        planned.append(next_chunk(lengths, start, max_tokens, max_seqs))
        start = planned[-1].stop
    assert planned == chunks


@pytest.mark.parametrize(("inputs", "problem"), [
    ([(1, 2), ()], "input 1 has no tokens"),
    ([(1, 32)], "token id 32 is outside the model's vocabulary"),
    ([(-1,)], "token id -1"),
    ([tuple(range(9))], "input 0 is 9 tokens; this model embeds at most 8"),
])
def test_bad_inputs_are_refused_naming_the_input(inputs: list[tuple[int, ...]],
                                                 problem: str) -> None:
    with pytest.raises(InvalidGenerateRequest, match=problem) as info:
        check_inputs(inputs, n_vocab=32, max_tokens=8)
    assert info.value.param == "input"


def test_vectors_are_unit_length_float32() -> None:
    raw = normalised(np.array([3.0, 4.0]))
    assert np.frombuffer(raw, "<f4").tolist() == [0.6000000238418579, 0.800000011920929]
    assert np.frombuffer(normalised(np.zeros(3)), "<f4").tolist() == [0.0, 0.0, 0.0]


class ScriptedEmbedder:
    """A vector that is a pure function of the input's tokens; every decode is recorded."""

    def __init__(self, max_tokens: int, max_seqs: int) -> None:
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.decodes: list[list[tuple[int, ...]]] = []

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
        assert sum(map(len, inputs)) <= self.max_tokens and len(inputs) <= self.max_seqs
        self.decodes.append([tuple(i) for i in inputs])
        return [normalised(np.array([sum(i), len(i), 1.0])) for i in inputs]


    def close(self) -> None:
        self.closed = getattr(self, "closed", 0) + 1


def expected(tokens: Sequence[int]) -> bytes:
    return normalised(np.array([sum(tokens), len(tokens), 1.0]))


def engine(embedder: ScriptedEmbedder, **kw: object) -> BatchEngine:
    cfg = BatchConfig(model_path="scripted", n_ctx=1024, n_slots=2, embed_tokens=8,
                      embed_seqs=3, **kw)  # type: ignore[arg-type]
    return BatchEngine(cfg, ScriptedBackend(), embedder=lambda: embedder)


class Results(list[EmbedResult | MeshError]):
    def __call__(self, result: EmbedResult | MeshError) -> None:
        self.append(result)


def test_a_long_list_goes_one_chunk_per_step_beside_generation() -> None:
    embedder = ScriptedEmbedder(8, 3)
    eng, results, gen = engine(embedder), Results(), Collector()
    eng.submit("g", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0), gen)
    inputs: list[str | tuple[int, ...]] = ["ab", (1, 2, 3), "c", "d", (4,),
                                           (5, 6, 7, 8, 9, 10, 11)]
    eng.submit_embed("e", inputs, results)
    steps = 0
    while not results:
        assert eng.step()
        steps += 1
        assert len(embedder.decodes) == steps  # one bounded decode per step
    tokens = [tuple(ScriptedBackend().tokenize(i)) if isinstance(i, str) else i for i in inputs]
    assert embedder.decodes == [tokens[0:3], tokens[3:5], tokens[5:6]]
    assert results == [EmbedResult(tuple(expected(t) for t in tokens), 15)]
    assert "g" not in gen.finished  # generation went on meanwhile, a token per step
    assert len(gen.deltas["g"]) == steps


def test_while_streams_run_a_chunk_is_no_bigger_than_a_prefill_chunk() -> None:
    embedder = ScriptedEmbedder(8, 3)
    eng, results, gen = engine(embedder, prefill_chunk=3), Results(), Collector()
    inputs = [(1, 2), (3, 4), (5, 6, 7, 8, 9), (1,)]
    eng.submit_embed("idle", inputs, results)
    assert eng.step() and embedder.decodes == [[(1, 2), (3, 4)]]  # idle: up to 8 tokens
    eng.submit("g", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0), gen)
    while len(results) < 1:
        eng.step()
    assert embedder.decodes[1:] == [[(5, 6, 7, 8, 9)], [(1,)]]
    eng.submit_embed("busy", inputs, results)
    while len(results) < 2:
        eng.step()
    assert embedder.decodes[3:] == [[(1, 2)], [(3, 4)], [(5, 6, 7, 8, 9)], [(1,)]]


def test_an_invalid_input_is_refused_before_queueing() -> None:
    eng, results = engine(ScriptedEmbedder(8, 3)), Results()
    with pytest.raises(InvalidGenerateRequest, match="outside the model's vocabulary"):
        eng.submit_embed("e", [(1,), (99,)], results)
    assert not eng.step() and not results


def test_a_split_model_refuses_embeddings() -> None:
    cfg = BatchConfig(model_path="scripted", n_ctx=1024, n_slots=2,
                      load=LoadOptions.split_head((4,), repack=False))
    eng = BatchEngine(cfg, ScriptedBackend(), embedder=lambda: ScriptedEmbedder(8, 3))
    with pytest.raises(InvalidGenerateRequest, match="serves no embeddings") as info:
        eng.submit_embed("e", ["hi"], Results())
    assert info.value.param == "model"


def test_embedding_requests_beyond_the_queue_bound_are_refused() -> None:
    eng, results = engine(ScriptedEmbedder(8, 3), max_queue=1), Results()
    eng.submit_embed("a", ["x"], results)
    eng.submit_embed("b", ["y"], results)
    with pytest.raises(QueueFull):
        eng.submit_embed("c", ["z"], results)
    while eng.step():
        pass
    assert [len(r.vectors) for r in results if isinstance(r, EmbedResult)] == [1, 1]


def test_a_failing_decode_fails_that_request_only() -> None:
    class Broken(ScriptedEmbedder):
        def embed(self, inputs: Sequence[Sequence[int]]) -> list[bytes]:
            raise RuntimeError("boom")

    eng, results = engine(Broken(8, 3)), Results()
    eng.submit_embed("e", ["x"], results)
    assert eng.step()
    assert isinstance(results[0], MeshError) and "boom" in str(results[0])
    assert not eng.step()


def test_an_idle_embedding_context_is_freed_and_made_again_on_use() -> None:
    made: list[ScriptedEmbedder] = []

    def make() -> ScriptedEmbedder:
        made.append(ScriptedEmbedder(8, 3))
        return made[-1]

    cfg = BatchConfig(model_path="scripted", n_ctx=1024, n_slots=2, embed_tokens=8,
                      embed_seqs=3, embed_idle_s=0.05)
    eng, results = BatchEngine(cfg, ScriptedBackend(), embedder=make), Results()
    eng.start()
    try:
        eng.submit_embed("a", [(1, 2)], results)
        wait_for(lambda: len(results) == 1 and getattr(made[0], "closed", 0) == 1)
        eng.submit_embed("b", [(1, 2)], results)
        wait_for(lambda: len(results) == 2)
    finally:
        eng.stop()
    assert len(made) == 2 and results[0] == results[1]


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
