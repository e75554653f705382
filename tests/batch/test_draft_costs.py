"""The draft tuner on the scripted model with a clock charged as a device would charge it:
the cost of a pass and of a row fitted from the steps, and a free drafter (n-gram) measured
from shadow drafts instead of probes while drafting does not pay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, SpecMode

from .collect import Collector, drain
from .scripted import ChargedBackend, solo_greedy, target_rule

PROMPT = [1, 2, 3]
WRONG_FOR = 40  # generated tokens during which the drafter guesses wrong
GREEDY = SamplingParams(max_tokens=120, temperature=0.0)
PASS_S = ROW_S = 0.01  # rows as dear as a pass: a draft pays only when nearly always kept


class TurningDrafter:
    """Wrong for the first WRONG_FOR generated tokens of the request, then always right."""

    def __init__(self, free: bool) -> None:
        self.free = free

    def propose(self, wants: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for slot, (hist, k) in wants.items():
            h = list(hist)
            for _ in range(k):
                t = target_rule(h)
                h.append(t if len(h) - len(PROMPT) >= WRONG_FOR else (t + 1) % 31)
            out[slot] = h[len(hist):]
        return out


def rows_by_phase(free: bool) -> tuple[list[int], list[int], BatchEngine]:
    """Rows of each decode step while the drafter is wrong (after the first 8 tokens, which
    the tuner spends learning the costs) and once it is right."""
    backend = ChargedBackend(PASS_S, ROW_S)
    eng = BatchEngine(BatchConfig(model_path="scripted", n_ctx=1024, n_slots=1, n_batch=64,
                                  spec_mode=SpecMode.NGRAM, draft_max=8),
                      backend, TurningDrafter(free), clock=backend.clock)
    c = Collector()
    eng.submit("r", PROMPT, GREEDY, c)
    drain(eng)
    assert c.ids["r"] == solo_greedy(PROMPT, 120)
    generated = [(pos - len(PROMPT) + 1, rows) for pos, rows in backend.decodes[1:]]
    wrong = [rows for done, rows in generated if 8 <= done < WRONG_FOR]
    right = [rows for done, rows in generated if done >= WRONG_FOR]
    return wrong, right, eng


def test_a_free_drafter_is_not_probed_and_drafts_once_its_shadows_are_kept() -> None:
    wrong, right, eng = rows_by_phase(free=True)
    assert wrong and set(wrong) == {1}  # no probe spent a row
    assert max(right) > 1 and eng.stats().accepted_tokens > 0


def test_a_drafter_that_costs_something_is_probed_instead() -> None:
    wrong, _, _ = rows_by_phase(free=False)
    assert max(wrong) == 2  # one drafted token, one step in eight


class RightForOnePrompt:
    """Right for the prompt that starts with 1, wrong for any other."""

    def __init__(self, free: bool) -> None:
        self.free = free

    def propose(self, wants: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for slot, (hist, k) in wants.items():
            h = list(hist)
            for _ in range(k):
                t = target_rule(h)
                h.append(t if hist[0] == 1 else (t + 1) % 31)
            out[slot] = h[len(hist):]
        return out


def first_step_rows(free: bool, rtt_s: float = 0.05) -> int:
    """Rows of the first decode step of a request on text the drafter gets wrong, served
    after one on which it was always right (the engine's recent acceptance: high)."""
    backend = ChargedBackend(PASS_S, ROW_S, rtt_s=rtt_s)  # 0.05 s, a slow link: drafts pay
    eng = BatchEngine(BatchConfig(model_path="scripted", n_ctx=1024, n_slots=1, n_batch=64,
                                  spec_mode=SpecMode.NGRAM, draft_max=8),
                      backend, RightForOnePrompt(free), clock=backend.clock)
    for name, prompt in (("right", PROMPT), ("wrong", [9, 2, 3])):
        c = Collector()
        eng.submit(name, prompt, SamplingParams(max_tokens=40, temperature=0.0), c)
        before = len(backend.decodes)
        drain(eng)
        assert c.ids[name] == solo_greedy(prompt, 40)
    assert eng.stats().accepted_tokens > 0  # the first request was drafted for
    return backend.decodes[before + 1][1]  # after the prompt's decode


def test_a_free_drafter_drafts_on_the_requests_own_text_not_the_engines_prior() -> None:
    """Before a new request's own text has told anything, a free drafter drafts at most
    what a coin-flip acceptance pays for: nothing where rows are dear against the round
    trip (its guesses are shadows), a short draft on a slow link, where a drafter that
    costs something drafts on the engine's recent acceptance from the first step."""
    assert first_step_rows(free=True, rtt_s=0.0) == 1
    blind, trusting = first_step_rows(free=True), first_step_rows(free=False)
    assert 1 < blind < trusting
