"""The engine's draft tuner follows the split's round trip: at load (BatchConfig.link_rtt_s)
and live (BatchEngine.set_link_rtt, what the SetLinkRtt command calls), on the scripted
model."""

from __future__ import annotations

import math

import pytest
from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, SpecMode
from meshllm.worker.engine.batch.draft_tuning import usable_rtt_s

from .collect import Collector, drain
from .scripted import ChargedBackend, CorruptingDrafter, solo_greedy

GREEDY = SamplingParams(max_tokens=40, temperature=0.0)


@pytest.mark.parametrize(("given", "used"), [
    (0.02, 0.02),
    (0.0, 0.0),
    (-0.01, 0.0),         # nonsense: no wait
    (math.nan, 0.0),
    (math.inf, 0.0),
])
def test_usable_rtt_s(given: float, used: float) -> None:
    assert usable_rtt_s(given) == used


def engine(link_rtt_s: float = 0.0) -> tuple[BatchEngine, ChargedBackend]:
    # A row as dear as a pass: with no wait on a link drafts stay short.
    backend = ChargedBackend(pass_s=0.005, row_s=0.005, rtt_s=link_rtt_s)
    return BatchEngine(BatchConfig(model_path="scripted", n_ctx=1024, n_slots=1, n_batch=64,
                                   spec_mode=SpecMode.NGRAM, draft_max=8,
                                   link_rtt_s=link_rtt_s),
                       backend, CorruptingDrafter(), clock=backend.clock), backend


def drafts_per_step(eng: BatchEngine, rid: str) -> float:
    """Drafted tokens per verification of one greedy request run to its end."""
    before = eng.stats()
    c = Collector()
    eng.submit(rid, [1, 2, 3], GREEDY, c)
    drain(eng)
    assert c.ids[rid] == solo_greedy([1, 2, 3], 40)  # drafts never change the output
    after = eng.stats()
    return ((after.drafted_tokens - before.drafted_tokens)
            / (after.seq_steps - before.seq_steps))


def test_the_configured_round_trip_is_what_the_tuner_starts_with() -> None:
    eng, _ = engine(link_rtt_s=0.05)
    assert eng.link_rtt_s == 0.05 and eng.stats().link_rtt_us == 50_000
    assert engine(link_rtt_s=-1.0)[0].link_rtt_s == 0.0


def test_a_running_engine_takes_a_new_round_trip() -> None:
    # With no wait on a link rows as dear as the pass keep drafts short; 200 ms a step
    # makes them long, and they shorten again when the link does.
    eng, backend = engine()
    fast = drafts_per_step(eng, "fast")
    backend.rtt_s = 0.2
    eng.set_link_rtt(0.2)
    assert eng.link_rtt_s == 0.2 and eng.stats().link_rtt_us == 200_000
    slow = drafts_per_step(eng, "slow")
    backend.rtt_s = 0.0
    eng.set_link_rtt(0.0)
    back = drafts_per_step(eng, "back")
    assert slow > fast + 1 and slow > back + 1, (fast, slow, back)
    assert eng.link_rtt_s == 0.0
