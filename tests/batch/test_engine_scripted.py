"""The engine on a scripted model: batching, speculation, queueing, cancel, prefix reuse."""

from __future__ import annotations

import pytest
from meshllm.common.errors import PromptTooLong
from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, QueueFull, SpecMode
from meshllm.worker.engine.batch.draft import Drafter, ModelDrafter, NgramDrafter

from .collect import Collector, drain
from .scripted import (
    ChargedBackend,
    CorruptingDrafter,
    ScriptedBackend,
    draft_rule,
    solo_greedy,
    target_rule,
)

GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 1, 4, 1, 5, 9, 2, 6], [2, 7]]


def engine(n_ctx: int = 1024, n_slots: int = 4, max_queue: int = 16, n_batch: int = 512,
           prefill_chunk: int = 128) -> BatchEngine:
    return BatchEngine(BatchConfig(model_path="scripted", n_ctx=n_ctx, n_slots=n_slots,
                                   max_queue=max_queue, n_batch=n_batch,
                                   prefill_chunk=prefill_chunk), ScriptedBackend())


def as_text(tokens: list[int]) -> str:
    return "".join(chr(97 + t % 26) for t in tokens)


@pytest.mark.parametrize("drafter", ["corrupting", "model", "ngram"])
def test_speculative_greedy_emits_only_the_targets_choices(drafter: str) -> None:
    drafters: dict[str, Drafter] = {"corrupting": CorruptingDrafter(),
                                    "model": ModelDrafter(ScriptedBackend(draft_rule), 4, 64),
                                    "ngram": NgramDrafter(3, 1)}
    d = drafters[drafter]
    cfg = BatchConfig(model_path="scripted", n_ctx=1024, n_slots=4, n_batch=64,
                      spec_mode=SpecMode.NGRAM, draft_max=4)
    backend = ChargedBackend()  # passes dear: drafting pays whatever this machine's speed
    eng = BatchEngine(cfg, backend, d, clock=backend.clock)
    c = Collector()
    for i, p in enumerate(PROMPTS):
        eng.submit(f"r{i}", p, GREEDY, c)
    drain(eng)
    for i, p in enumerate(PROMPTS):
        # The scripted target's choice after every prefix, i.e. exactly the solo output.
        assert c.text[f"r{i}"] == as_text(solo_greedy(p, 20))
        assert c.finished[f"r{i}"].completion_tokens == 20
    s = eng.stats()
    if drafter != "ngram":
        assert 0 < s.accepted_tokens < s.drafted_tokens
        assert s.tokens_per_step > 1.0


def test_every_emitted_token_is_the_targets_argmax_for_its_prefix() -> None:
    eng = BatchEngine(BatchConfig(model_path="s", n_ctx=512, n_slots=2, n_batch=32,
                                  spec_mode=SpecMode.NGRAM, draft_max=5),
                      ScriptedBackend(), CorruptingDrafter())
    c = Collector()
    eng.submit("a", [5, 5, 5], GREEDY, c)
    drain(eng)
    hist = [5, 5, 5]
    for ch in c.text["a"]:
        want = target_rule(hist)
        assert ch == chr(97 + want % 26)
        hist.append(want)


def test_queue_bound_and_stats() -> None:
    eng = engine(n_slots=2, max_queue=1)
    c = Collector()
    for i in range(3):
        eng.submit(f"r{i}", [1, 2], GREEDY, c)
    with pytest.raises(QueueFull) as err:
        eng.submit("r3", [1, 2], GREEDY, c)
    assert err.value.queued == 3 and err.value.max_queue == 1
    eng.step()
    s = eng.stats()
    assert (s.running, s.queued) == (2, 1)
    drain(eng)
    assert sorted(c.finished) == ["r0", "r1", "r2"]
    assert eng.stats().running == 0


def test_prompt_longer_than_a_slot_is_refused() -> None:
    with pytest.raises(PromptTooLong):
        engine(n_ctx=64, n_slots=4).submit("x", list(range(16)), GREEDY, Collector())


def test_cancel_running_and_queued() -> None:
    eng = engine(n_slots=1)
    c = Collector()
    eng.submit("run", [1], SamplingParams(max_tokens=100, temperature=0.0), c)
    eng.submit("wait", [2], GREEDY, c)
    eng.step()
    eng.step()
    assert eng.cancel("wait") and eng.cancel("run")
    assert not eng.cancel("nope")
    drain(eng)
    assert c.finished["wait"].reason == "cancelled"
    assert c.finished["run"].reason == "cancelled"
    assert 0 < c.finished["run"].completion_tokens < 100


def test_a_long_prompt_joining_midway_is_chunked_and_streams_keep_flowing() -> None:
    eng = engine(n_slots=4, prefill_chunk=4, n_batch=64)
    c = Collector()
    for i in range(3):
        eng.submit(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=30, temperature=0.0), c)
    for _ in range(5):
        eng.step()
    eng.submit("late", list(range(1, 30)) * 2, GREEDY, c)
    before = {r: len(c.deltas[r]) for r in ("r0", "r1", "r2")}
    for _ in range(10):  # 58 prompt tokens in chunks of 4: the late prompt needs 15 steps
        eng.step()
        assert "late" not in c.deltas
    assert all(len(c.deltas[r]) == before[r] + 10 for r in before)  # one token every step
    drain(eng)
    for i in range(3):
        assert c.text[f"r{i}"] == as_text(solo_greedy(PROMPTS[i], 30))


def test_prefix_reuse_skips_the_shared_prompt_and_changes_nothing() -> None:
    first = [3, 1, 4, 1, 5, 9, 2, 6]
    eng = engine(n_slots=2)
    c = Collector()
    eng.submit("t1", first, GREEDY, c)
    drain(eng)
    follow = [*first, *solo_greedy(first, 20)[:-1], 7, 7]  # the chat goes on
    processed = eng.stats().prompt_tokens_processed
    eng.submit("t2", follow, GREEDY, c)
    drain(eng)
    assert c.finished["t2"].cached_prompt_tokens == len(first) + 19
    assert eng.stats().prompt_tokens_processed - processed == 2
    assert c.text["t2"] == as_text(solo_greedy(follow, 20))


def test_stop_string_and_end_of_generation() -> None:
    eng = engine()
    c = Collector()
    want = as_text(solo_greedy([1, 2, 3], 20))
    stop = want[3:6]
    eng.submit("s", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)), c)
    eng.submit("b", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0,
                                              logit_bias=((31, 100.0),)), c)  # 31 is EOG
    drain(eng)
    assert c.text["s"] == want[:want.index(stop)] == "uif"
    assert c.finished["s"].reason == "stop"
    assert c.finished["b"].reason == "stop" and c.finished["b"].completion_tokens == 0


def test_seeded_sampling_is_reproducible_with_and_without_speculation() -> None:
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=11)
    outs = []
    for mode in (SpecMode.NONE, SpecMode.NONE, SpecMode.NGRAM, SpecMode.NGRAM):
        eng = BatchEngine(BatchConfig(model_path="s", n_ctx=512, n_slots=2, spec_mode=mode),
                          ScriptedBackend(),
                          CorruptingDrafter() if mode is SpecMode.NGRAM else None)
        c = Collector()
        eng.submit("x", [1, 2, 3], sampled, c)
        drain(eng)
        outs.append(c.text["x"])
    # The drafts (wrong on purpose) change no token: speculation keeps seeded output.
    assert outs[0] == outs[1] == outs[2] == outs[3]
    assert outs[0] != as_text(solo_greedy([1, 2, 3], 40))  # it did sample
