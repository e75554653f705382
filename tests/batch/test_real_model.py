"""The engine on the real model (gemma3-270m, 2 threads). llama.cpp's kernels are not
bit-identical across batch sizes, so batched or speculative greedy output is compared with
solo output by agreement, which is printed (run with -s), not asserted."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from meshllm.common.models import materialize
from meshllm.common.types import ChatMessage, SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, SpecMode

from .collect import Collector, drain

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "List three colors:",
    "The meaning of life is", "Water boils at", "My favourite food is", "In 1492,",
]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def model() -> str:
    return str(materialize("gemma3-270m"))


@pytest.fixture(scope="module")
def shared(model: str) -> Iterator[BatchEngine]:
    yield BatchEngine(BatchConfig(model_path=model, n_ctx=4096, n_slots=8, n_threads=2,
                                  prefix_reuse=False))


def fresh(model: str, **kw: object) -> BatchEngine:
    settings: dict[str, object] = {"n_ctx": 4096, "n_slots": 8, "n_threads": 2, **kw}
    return BatchEngine(BatchConfig(model_path=model, **settings))  # type: ignore[arg-type]


def run(eng: BatchEngine, prompts: Sequence[str], sampling: SamplingParams = GREEDY,
        ) -> Collector:
    c = Collector()
    for i, p in enumerate(prompts):
        eng.submit(f"r{i}", eng.tokenize(p), sampling, c)
    drain(eng)
    assert not c.failed
    return c


def agreement(a: Sequence[int], b: Sequence[int]) -> tuple[float, int]:
    """Share of identical tokens (same position) over the longer output, and the index of
    the first token that differs."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
             min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return same / max(len(a), len(b), 1), n


def report(title: str, got: Collector, want: Collector) -> None:
    rows = [agreement(got.ids.get(r, []), want.ids.get(r, [])) for r in sorted(want.finished)]
    same = sum(1 for s, _ in rows if s == 1.0)
    share = sum(s for s, _ in rows) / len(rows)
    print(f"\n{title}: {same}/{len(rows)} outputs identical; {share:.3f} of tokens identical;"
          f" first differing token at {[n for s, n in rows if s < 1.0]}")


def test_eight_concurrent_streams_complete(shared: BatchEngine) -> None:
    batched = run(shared, PROMPTS)
    assert len(batched.finished) == 8
    assert all(f.completion_tokens == 32 or f.reason == "stop" for f in batched.finished.values())
    solo = Collector()
    for i, p in enumerate(PROMPTS):
        shared.submit(f"r{i}", shared.tokenize(p), GREEDY, solo)
        drain(shared)
    report("batch of 8 vs solo (greedy)", batched, solo)


def test_same_batch_replayed_gives_same_outputs(model: str) -> None:
    first, second = run(fresh(model), PROMPTS), run(fresh(model), PROMPTS)
    assert first.ids == second.ids and first.text == second.text


def test_a_request_joining_midway_does_not_disturb_the_others(model: str) -> None:
    long_prompt = " ".join(["The history of the river and the town beside it."] * 30)
    alone, joined = fresh(model, prefill_chunk=32), fresh(model, prefill_chunk=32)
    base = run(alone, PROMPTS[:4])
    c = Collector()
    for i, p in enumerate(PROMPTS[:4]):
        joined.submit(f"r{i}", joined.tokenize(p), GREEDY, c)
    for _ in range(6):
        joined.step()
    before = {r: len(c.deltas[r]) for r in ("r0", "r1", "r2", "r3")}
    prefix = {r: c.text[r] for r in before}
    joined.submit("late", joined.tokenize(long_prompt), GREEDY, c)
    joined.step()
    joined.step()  # the late prompt is in chunks of 32: it has not produced a token yet
    assert "late" not in c.deltas
    assert all(len(c.deltas[r]) == before[r] + 2 for r in before)  # streams keep flowing
    drain(joined)
    assert c.finished["late"].completion_tokens > 0
    for r, text in prefix.items():
        assert base.text[r].startswith(text)  # what came before the join is untouched
    report("4 streams with a joiner vs without", c, base)


def test_prefix_reuse_gives_identical_output_and_processes_fewer_tokens(model: str) -> None:
    turn1 = "<start_of_turn>user\nName a large animal.<end_of_turn>\n<start_of_turn>model\n"
    reuse, plain = fresh(model), fresh(model, prefix_reuse=False)
    first = run(reuse, [turn1])
    turn2 = (f"{turn1}{first.text['r0']}<end_of_turn>\n<start_of_turn>user\n"
             "And a small one?<end_of_turn>\n<start_of_turn>model\n")
    before = reuse.stats().prompt_tokens_processed
    with_reuse, without = run(reuse, [turn2]), run(plain, [turn2])
    cached = with_reuse.finished["r0"].cached_prompt_tokens
    processed = reuse.stats().prompt_tokens_processed - before
    print(f"\nprefix reuse: prompt {with_reuse.finished['r0'].prompt_tokens} tokens, "
          f"{cached} reused, {processed} processed (without reuse: "
          f"{plain.stats().prompt_tokens_processed})")
    assert cached > 0 and processed < plain.stats().prompt_tokens_processed
    assert with_reuse.text == without.text


def test_seeded_sampling_is_reproducible(shared: BatchEngine) -> None:
    sampled = SamplingParams(max_tokens=32, temperature=0.9, top_p=0.95, top_k=40, seed=1234,
                             repeat_penalty=1.1)
    a, b = run(shared, PROMPTS[:3], sampled), run(shared, PROMPTS[:3], sampled)
    other = run(shared, PROMPTS[:3], SamplingParams(max_tokens=32, temperature=0.9, seed=99))
    assert a.text == b.text
    assert a.text != other.text


@pytest.mark.parametrize("mode", [SpecMode.NGRAM, SpecMode.DRAFT])
def test_speculative_greedy_agrees_with_solo(model: str, shared: BatchEngine,
                                             mode: SpecMode) -> None:
    prompts = [f"Repeat after me: {p} {p} {p}" for p in PROMPTS[:4]]
    # Told of a slow link, so that drafting pays and every step verifies drafts (on this
    # CPU's loopback the tuner rightly drafts nothing once it has timed a row).
    spec = fresh(model, spec_mode=mode, draft_model_path=model, n_slots=4, n_ctx=2048,
                 link_rtt_s=0.05)
    got = run(spec, prompts)
    solo = Collector()
    for i, p in enumerate(prompts):
        shared.submit(f"r{i}", shared.tokenize(p), GREEDY, solo)
        drain(shared)
    s = spec.stats()
    assert s.drafted_tokens > 0 and s.accepted_tokens > 0
    print(f"\n{mode.value}: acceptance {s.acceptance_rate:.2f}, "
          f"{s.tokens_per_step:.2f} tokens per step")
    report(f"speculative ({mode.value}) batch of 4 vs solo (greedy)", got, solo)


def test_chat_prompt_is_rendered_with_the_models_template(shared: BatchEngine) -> None:
    tokens, stops = shared.prompt_tokens(None, (ChatMessage("user", "Hi"),))
    assert tokens == shared.tokenize("<start_of_turn>user\nHi<end_of_turn>\n"
                                     "<start_of_turn>model\n")
    assert stops and shared.prompt_tokens("Hi", None)[1] == ()
