"""Table-driven tests of the engine's pure decisions: scheduling, chunking, slot placement,
n-gram lookup and sampling transforms."""

from __future__ import annotations

import numpy as np
import pytest
from meshllm.worker.engine.batch.ngram import propose_ngram
from meshllm.worker.engine.batch.prefix import FreeSlot, Placement, common_prefix, place
from meshllm.worker.engine.batch.sampling import SamplerSpec, adjust, distribution, draw
from meshllm.worker.engine.batch.scheduler import SlotState, StepPlan, draft_budget, plan_step


@pytest.mark.parametrize(("slots", "n_batch", "chunk", "plan"), [
    ([], 512, 128, StepPlan((), ())),
    # nothing generating: a prompt may use the whole batch
    ([SlotState(0, 900)], 512, 128, StepPlan((), ((0, 512),))),
    # generating slots each take one token; prompts share the chunk budget, oldest first
    ([SlotState(0, 0), SlotState(1, 300, admitted=2), SlotState(2, 50, admitted=1)], 512, 128,
     StepPlan((0,), ((2, 50), (1, 78)))),
    # drafts count against the batch
    ([SlotState(0, 0, drafts=4), SlotState(1, 0, drafts=2), SlotState(2, 40)], 10, 8,
     StepPlan((0, 1), ((2, 2),))),
    ([SlotState(0, 0, drafts=4), SlotState(1, 9)], 5, 5, StepPlan((0,), ())),
])
def test_plan_step(slots: list[SlotState], n_batch: int, chunk: int, plan: StepPlan) -> None:
    assert plan_step(slots, n_batch, chunk) == plan


@pytest.mark.parametrize(("draft_max", "remaining", "room", "k"), [
    (4, 100, 100, 4), (4, 3, 100, 2), (4, 1, 100, 0), (4, 100, 2, 1), (0, 9, 9, 0),
])
def test_draft_budget(draft_max: int, remaining: int, room: int, k: int) -> None:
    assert draft_budget(draft_max, remaining, room) == k


@pytest.mark.parametrize(("a", "b", "n"), [
    ([], [1], 0), ([1, 2, 3], [1, 2, 4], 2), ([1, 2], [1, 2, 3], 2), ([5], [6], 0),
])
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == n


@pytest.mark.parametrize(("free", "prompt", "enabled", "want"), [
    # longest shared prefix wins
    ([FreeSlot(0, [1, 2], 5), FreeSlot(1, [1, 2, 3, 4], 9)], [1, 2, 3, 4, 5], True,
     Placement(1, 4)),
    # the last prompt token is always evaluated again, for its logits
    ([FreeSlot(0, [1, 2, 3], 0)], [1, 2, 3], True, Placement(0, 2)),
    # no match: the least recently used slot
    ([FreeSlot(0, [7], 5), FreeSlot(1, [8], 2)], [1, 2], True, Placement(1, 0)),
    ([FreeSlot(0, [1, 2, 3], 0)], [1, 2, 3, 4], False, Placement(0, 0)),
    # a short shared opening (a chat template's) does not take another conversation's
    # slot: the least recently used one is taken, and what it shares is still reused
    ([FreeSlot(0, [1, 2, 9, 9, 9, 9], 1), FreeSlot(1, [], 0)], [1, 2, 3, 4, 5, 6], True,
     Placement(1, 0)),
    ([FreeSlot(0, [1, 2, 9, 9], 0), FreeSlot(1, [5], 3)], [1, 2, 3, 4, 5, 6], True,
     Placement(0, 2)),
    # half the prompt shared is enough
    ([FreeSlot(0, [1, 2, 3, 9], 1), FreeSlot(1, [], 0)], [1, 2, 3, 4, 5, 6], True,
     Placement(0, 3)),
])
def test_place(free: list[FreeSlot], prompt: list[int], enabled: bool, want: Placement) -> None:
    assert place(free, prompt, enabled) == want


@pytest.mark.parametrize(("hist", "k", "want"), [
    ([1, 2, 3, 9, 1, 2, 3], 3, [9, 1, 2]),  # trigram seen before
    ([1, 2, 5, 6, 1, 2], 2, [5, 6]),  # bigram
    ([4, 1, 7, 8, 2, 5, 1], 2, [7, 8]),  # unigram fallback
    ([1, 2, 3, 4], 2, []),  # nothing repeats
    ([1, 5, 1, 6, 1], 1, [6]),  # the most recent occurrence wins
    ([1, 2, 1, 2], 0, []),
])
def test_propose_ngram(hist: list[int], k: int, want: list[int]) -> None:
    assert propose_ngram(hist, 3, 1, k) == want


LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0], dtype=np.float32)


@pytest.mark.parametrize(("spec", "ids"), [
    (SamplerSpec(temperature=0.0), [1]),
    (SamplerSpec(top_k=2), [1, 2]),
    (SamplerSpec(top_p=0.5), [1]),
    (SamplerSpec(top_p=0.8), [1, 2]),
    (SamplerSpec(min_p=0.3), [1, 2]),  # exp(2-3) = 0.37 >= 0.3, exp(1-3) = 0.14 < 0.3
    (SamplerSpec(logit_bias=((4, 10.0),), temperature=0.0), [4]),
    (SamplerSpec(), [0, 1, 2, 3, 4]),
])
def test_distribution_support(spec: SamplerSpec, ids: list[int]) -> None:
    d = distribution(LOGITS, spec, [])
    assert sorted(d.ids.tolist()) == ids
    assert d.probs.sum() == pytest.approx(1.0)


def test_temperature_applies_after_filtering() -> None:
    d = distribution(LOGITS, SamplerSpec(top_k=2, temperature=0.5), [])
    p = dict(zip(d.ids.tolist(), d.probs.tolist(), strict=True))
    assert p[1] / p[2] == pytest.approx(np.exp((3.0 - 2.0) / 0.5))


def test_top_p_on_a_large_vocabulary_matches_a_full_sort() -> None:
    x = np.random.default_rng(1).normal(size=50_000).astype(np.float32)
    got = set(distribution(x, SamplerSpec(top_p=0.9), []).ids.tolist())
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-p)
    want = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.9)) + 1].tolist())
    assert got == want


@pytest.mark.parametrize(("spec", "history", "want"), [
    (SamplerSpec(repeat_penalty=2.0), [1, 4], [1.0, 1.5, 2.0, 0.5, -2.0]),
    (SamplerSpec(presence_penalty=1.0), [2, 2], [1.0, 3.0, 1.0, 0.5, -1.0]),
    (SamplerSpec(frequency_penalty=0.5), [2, 2, 0], [0.5, 3.0, 1.0, 0.5, -1.0]),
    (SamplerSpec(repeat_penalty=2.0, penalty_last_n=1), [1, 4], [1.0, 3.0, 2.0, 0.5, -2.0]),
])
def test_penalties(spec: SamplerSpec, history: list[int], want: list[float]) -> None:
    assert adjust(LOGITS, spec, history).tolist() == pytest.approx(want)
    assert LOGITS.tolist() == [1.0, 3.0, 2.0, 0.5, -1.0]  # the row itself is untouched


@pytest.mark.parametrize(("u", "token"), [(0.0, 7), (0.19, 7), (0.2, 8), (0.99, 9)])
def test_draw(u: float, token: int) -> None:
    from meshllm.worker.engine.batch.sampling import Dist

    assert draw(Dist(np.array([7, 8, 9]), np.array([0.2, 0.5, 0.3])), u) == token
