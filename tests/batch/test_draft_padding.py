"""Padded drafts on the scripted model (step.py, ubatch.padded_drafts): padding joins a
step's verifications into one ubatch and never changes what is emitted, nor the drafter's
measured acceptance (a cut in the padding is not a rejection)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, SpecMode
from meshllm.worker.engine.batch.sampling import Logits
from meshllm.worker.engine.batch.ubatch import count_ubatches

from .collect import Collector, drain
from .scripted import CorruptingDrafter, ScriptedBackend, solo_greedy

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 1, 4, 1, 5, 9, 2, 6]]


class UnevenDrafter(CorruptingDrafter):
    """The corrupting drafter's guesses, cut to as many tokens as the slot's index: drafts
    of 0, 1, 2 and 3 tokens, which llama.cpp would verify as several ubatches."""

    def propose(self, wants: Mapping[int, tuple[Sequence[int], int]]) -> dict[int, list[int]]:
        return {s: d[:s] for s, d in super().propose(wants).items()}


class CountingBackend(ScriptedBackend):
    """Records how many ubatches llama.cpp would make of each decode of several slots."""

    def __init__(self) -> None:
        super().__init__()
        self.ubatches: list[int] = []

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               outputs: Sequence[bool]) -> list[Logits]:
        per_seq = [seqs.count(s) for s in range(max(seqs) + 1)]
        if sum(n > 0 for n in per_seq) > 1:
            self.ubatches.append(count_ubatches(per_seq))
        return super().decode(tokens, positions, seqs, outputs)


def run(pad: bool, sampling: SamplingParams = GREEDY) -> tuple[Collector, BatchEngine,
                                                               CountingBackend]:
    backend = CountingBackend()
    eng = BatchEngine(BatchConfig(model_path="scripted", n_ctx=1024, n_slots=4, n_batch=64,
                                  spec_mode=SpecMode.NGRAM, draft_max=4, pad_drafts=pad),
                      backend, UnevenDrafter())
    c = Collector()
    for i, p in enumerate(PROMPTS):
        eng.submit(f"r{i}", p, sampling, c)
    drain(eng)
    return c, eng, backend


@pytest.mark.parametrize("pad", [False, True])
def test_greedy_output_is_the_targets_own_with_or_without_padding(pad: bool) -> None:
    c, _, _ = run(pad)
    for i, p in enumerate(PROMPTS):
        assert c.ids[f"r{i}"] == solo_greedy(p, 24)


def test_padding_joins_the_verifications_into_fewer_ubatches() -> None:
    _, plain, unpadded = run(pad=False)
    _, padded, counted = run(pad=True)
    assert max(unpadded.ubatches) > 1
    assert sum(counted.ubatches) < sum(unpadded.ubatches)
    # Only real drafts count: the acceptance is the drafter's, with or without padding.
    assert padded.stats().drafted_tokens == plain.stats().drafted_tokens
    assert padded.stats().accepted_tokens == plain.stats().accepted_tokens


def test_sampled_requests_are_never_padded() -> None:
    sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=3)
    a, _, unpadded = run(pad=False, sampling=sampled)
    b, _, padded = run(pad=True, sampling=sampled)
    assert a.ids == b.ids and padded.ubatches == unpadded.ubatches
