"""Drafts of different lengths on the scripted model (step.py, ubatch.cut_drafts and
ubatch.padded_drafts): cut to a common length, or padded first (opt-in) and then cut, a
step's verifications form one ubatch, and neither changes what is emitted; padding counts only
real drafts in the measured acceptance (a cut in the padding is not a rejection).

The backend advances a fake clock as a split would cost (a pass and the round trips per
ubatch, a little per row), so the draft tuner's decisions do not depend on this machine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, SpecMode

from .collect import Collector, drain
from .scripted import ChargedBackend, CorruptingDrafter, solo_greedy

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=24, temperature=1.0, seed=3)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 1, 4, 1, 5, 9, 2, 6]]
PASS_S, ROW_S = 0.05, 0.002  # a ubatch (compute and round trips), a row


class UnevenDrafter(CorruptingDrafter):
    """The corrupting drafter's guesses, cut to one more token than the slot's index:
    drafts of 1, 2, 3 and 4 tokens, which llama.cpp would verify as several ubatches."""

    def __init__(self) -> None:
        super().__init__()
        self.returned = 0

    def propose(self, wants: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        drafts = {s: d[:s + 1] for s, d in super().propose(wants).items()}
        self.returned += sum(map(len, drafts.values()))
        return drafts


def run(pad: bool, sampling: SamplingParams = GREEDY
        ) -> tuple[Collector, BatchEngine, ChargedBackend, UnevenDrafter]:
    backend, drafter = ChargedBackend(PASS_S, ROW_S), UnevenDrafter()
    eng = BatchEngine(BatchConfig(model_path="scripted", n_ctx=1024, n_slots=4, n_batch=64,
                                  spec_mode=SpecMode.NGRAM, draft_max=4, pad_drafts=pad),
                      backend, drafter, clock=backend.clock)
    c = Collector()
    for i, p in enumerate(PROMPTS):
        eng.submit(f"r{i}", p, sampling, c)
    drain(eng)
    return c, eng, backend, drafter


@pytest.mark.parametrize("pad", [False, True])
def test_greedy_output_is_the_targets_own_cut_or_padded(pad: bool) -> None:
    c, eng, _, _ = run(pad)
    for i, p in enumerate(PROMPTS):
        assert c.ids[f"r{i}"] == solo_greedy(p, 24)
    assert eng.stats().accepted_tokens > 0


def test_uneven_drafts_are_verified_in_one_ubatch() -> None:
    _, cut, cut_backend, cut_drafter = run(pad=False)
    _, padded, padded_backend, padded_drafter = run(pad=True)
    assert cut_backend.ubatches and set(cut_backend.ubatches) == {1}
    assert padded_backend.ubatches and set(padded_backend.ubatches) == {1}
    # Cut to the shortest, fewer are verified than proposed; padding the short ones up
    # keeps more of them, and counts only the real drafts.
    assert 0 < cut.stats().drafted_tokens < cut_drafter.returned
    assert cut.stats().drafted_tokens < padded.stats().drafted_tokens
    assert padded.stats().drafted_tokens <= padded_drafter.returned


def test_sampled_requests_are_cut_but_never_padded() -> None:
    cut, cut_eng, cut_backend, _ = run(pad=False, sampling=SAMPLED)
    kept, kept_eng, kept_backend, _ = run(pad=True, sampling=SAMPLED)
    assert cut.ids == kept.ids
    assert set(cut_backend.ubatches) == {1}  # a cut never changes a token: sampled too
    # Padding was proven on greedy requests only: with it on, sampled ones are only cut.
    assert kept_backend.ubatches == cut_backend.ubatches
    assert kept_eng.stats().drafted_tokens == cut_eng.stats().drafted_tokens
