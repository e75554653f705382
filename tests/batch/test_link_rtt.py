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
from .scripted import CorruptingDrafter, ScriptedBackend, solo_greedy

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


def engine(link_rtt_s: float = 0.0) -> BatchEngine:
    return BatchEngine(BatchConfig(model_path="scripted", n_ctx=1024, n_slots=1, n_batch=64,
                                   spec_mode=SpecMode.NGRAM, draft_max=8,
                                   link_rtt_s=link_rtt_s),
                       ScriptedBackend(), CorruptingDrafter())


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
    eng = engine(link_rtt_s=0.05)
    assert eng.link_rtt_s == 0.05 and eng.stats().link_rtt_us == 50_000
    assert engine(link_rtt_s=-1.0).link_rtt_s == 0.0


def test_a_running_engine_takes_a_new_round_trip() -> None:
    # The scripted model computes a step in microseconds: with no wait on a link the rows
    # cost as much as the step and drafts stay short; 200 ms a step makes them long.
    eng = engine()
    fast = drafts_per_step(eng, "fast")
    eng.set_link_rtt(0.2)
    assert eng.link_rtt_s == 0.2 and eng.stats().link_rtt_us == 200_000
    slow = drafts_per_step(eng, "slow")
    eng.set_link_rtt(0.0)
    back = drafts_per_step(eng, "back")
    assert slow > fast + 1 and slow > back + 1, (fast, slow, back)
    assert eng.link_rtt_s == 0.0
