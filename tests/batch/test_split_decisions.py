"""Decisions for split models: the draft length from the link and the step (draft_tuning),
and the placeholder rows that keep a step's decodes in one ubatch (ubatch)."""

from __future__ import annotations

import pytest
from meshllm.worker.engine.batch.draft import ShadowDrafts
from meshllm.worker.engine.batch.draft_tuning import (
    NOMINAL_STEP_S,
    ROW_SHARE,
    Acceptance,
    CostFit,
    DraftTuner,
    draft_length,
)
from meshllm.worker.engine.batch.ubatch import (
    count_ubatches,
    cut_drafts,
    gap_fillers,
    padded_drafts,
)
from meshllm.worker.links import step_round_trip_s

STEP = 0.023  # gemma3-270m, one sequence, 2 threads, here


@pytest.mark.parametrize(("rtt_s", "acceptance", "seqs", "expected"), [
    (0.0, 0.5, 1, 2),      # loopback: a short draft pays for its rows
    (0.02, 0.5, 1, 2),
    (0.1, 0.5, 1, 4),      # a slow link: longer drafts
    (0.0, 0.9, 1, 7),      # drafts that are nearly always right: long even on loopback
    (0.05, 0.9, 1, 8),     # capped at k_max
    (0.1, 0.2, 1, 2),      # a poor drafter still pays a little on a slow link
    (0.0, 0.0, 1, 0),      # never accepted: never worth a row
    (0.1, 0.0, 1, 0),
    (0.0, 0.5, 8, 0),      # eight streams on loopback: rows cost more than they bring
    (0.05, 0.7, 8, 2),
    (0.1, 0.9, 8, 6),
    (0.0, 1.0, 1, 8),      # always accepted
])
def test_draft_length(rtt_s: float, acceptance: float, seqs: int, expected: int) -> None:
    assert draft_length(rtt_s, STEP, acceptance, seqs=seqs) == expected


@pytest.mark.parametrize("acceptance", [0.3, 0.5, 0.7, 0.9])
def test_draft_length_grows_with_the_round_trip(acceptance: float) -> None:
    lengths = [draft_length(r / 1000, STEP, acceptance) for r in (0, 5, 20, 50, 100, 200)]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]


def test_draft_length_respects_k_max_and_odd_inputs() -> None:
    assert draft_length(1.0, STEP, 0.99, k_max=3) == 3
    assert draft_length(-1.0, 0.0, 1.5, k_max=2) == 2  # clamped, never raises
    assert draft_length(0.0, STEP, 0.9, k_max=0) == 0


def test_tuner_starts_long_on_a_slow_link_and_follows_the_acceptance() -> None:
    slow = DraftTuner(rtt_s=0.1, k_max=8)
    assert slow.length(1, 0.5) == 8  # nothing measured yet: the round trip alone says long
    assert DraftTuner(rtt_s=0.0, k_max=8).length(1, 0.5) == 2
    for _ in range(30):
        slow.observe(wall_s=0.1 + STEP * (1 + 4 / 6), rows=5)
    assert slow.step_s == pytest.approx(STEP, rel=0.01)
    lengths = [slow.length(1, 0.0) for _ in range(16)]  # never kept: a probe in 8
    assert lengths.count(1) == 2 and lengths.count(0) == 14
    assert slow.length(1, 0.95) == 8


@pytest.mark.parametrize(("updates", "expected"), [
    ([], 0.5),                       # the prior
    ([(8, 0)], 0.9),                 # one draft of 8 kept whole
    ([(0, 1)], 1 / 3),               # one cut at its first token
    ([(3, 1)], 4 / 6),
    ([(0, 0)], 0.5),                 # nothing drafted: nothing learnt
    ([(8, 0)] * 20 + [(0, 1)] * 20, 0.32),  # repeated, then stopped: the old fades
    ([(8, 0)] * 20 + [(0, 1)] * 40, 0.13),
])
def test_acceptance(updates: list[tuple[int, int]], expected: float) -> None:
    assert Acceptance(prior=0.9).value == 0.9  # what the engine saw lately, at admission
    acceptance = Acceptance()
    for kept, cut in updates:
        acceptance.update(kept, cut)
    assert acceptance.value == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(("rows", "idle", "max_rows", "expected"), [
    ({0: 1, 1: 1, 6: 1, 7: 1}, [2, 3, 4, 5], 4, {2: 1, 3: 1, 4: 1, 5: 1}),
    ({0: 1, 2: 1}, [1, 3], 2, {1: 1}),
    ({0: 3, 2: 3}, [1], 6, {1: 3}),           # drafts: the placeholder matches their rows
    ({0: 1, 1: 1, 2: 1}, [3], 3, {}),         # already one run
    ({0: 1, 7: 1}, list(range(1, 7)), 2, {}),  # six placeholders for two rows: not worth it
    ({0: 1, 2: 1}, [3], 2, {}),               # slot 1 prefills: its chunk splits anyway
    ({0: 1, 2: 3}, [1], 4, {}),               # unequal drafts split the batch anyway
    ({4: 1}, [0, 1, 2, 3], 1, {}),
    ({}, [0, 1], 0, {}),
])
def test_gap_fillers(rows: dict[int, int], idle: list[int], max_rows: int,
                     expected: dict[int, int]) -> None:
    assert gap_fillers(rows, idle, max_rows) == expected


@pytest.mark.parametrize(("rows", "expected"), [
    ([1] * 8, 1),
    ([4, 1, 3, 1, 1, 5, 2, 1], 5),  # drafts of 3, 0, 2, 0, 0, 4, 1, 0
    ([3, 3, 3], 1),
    ([1, 2], 2),
    ([2, 1], 2),
    ([1, 0, 1], 2),                 # an empty slot between (no filler): two runs
    ([], 0),
])
def test_count_ubatches(rows: list[int], expected: int) -> None:
    assert count_ubatches(rows) == expected


ROW, PASS = 0.004, 0.023


@pytest.mark.parametrize(("lengths", "caps", "ubatch_s", "expected"), [
    # one stream drafts 3, three have nothing: padding 9 rows saves one ubatch
    ({0: 3, 1: 0, 2: 0, 3: 0}, {0: 8, 1: 8, 2: 8, 3: 8}, PASS, {0: 3, 1: 0, 2: 0, 3: 0}),
    ({0: 3, 1: 0, 2: 0, 3: 0}, {0: 8, 1: 8, 2: 8, 3: 8}, PASS + 0.05,
     {0: 3, 1: 3, 2: 3, 3: 3}),     # on a slow link the rows are worth it
    ({0: 3, 1: 2}, {0: 8, 1: 8}, PASS, {0: 3, 1: 3}),  # one row saves a pass
    ({0: 3, 1: 2}, {0: 8}, PASS, {0: 3, 1: 2}),        # slot 1 samples: never padded
    ({0: 3, 1: 1}, {0: 8, 1: 2}, PASS, {0: 3, 1: 1}),  # its cap keeps it short: no saving
    ({0: 2, 1: 2}, {0: 8, 1: 8}, PASS, {0: 2, 1: 2}),  # already equal
    ({}, {}, PASS, {}),
])
def test_padded_drafts(lengths: dict[int, int], caps: dict[int, int], ubatch_s: float,
                       expected: dict[int, int]) -> None:
    assert padded_drafts(lengths, caps, ROW, ubatch_s) == expected


SLOW = PASS + 0.04  # a pass and the round trips of a 2-hop split at +20 ms per hop


@pytest.mark.parametrize(("lengths", "acceptance", "ubatch_s", "expected"), [
    # two streams of eight found a draft: three passes for them, so none is drafted
    ({0: 0, 1: 0, 2: 3, 3: 0, 4: 0, 5: 3, 6: 0, 7: 0}, 0.5, SLOW, dict.fromkeys(range(8), 0)),
    ({0: 0, 1: 0, 2: 3, 3: 0, 4: 0, 5: 3, 6: 0, 7: 0}, 0.9, SLOW, dict.fromkeys(range(8), 0)),
    # all drafted, unequally: cut to the shortest, one pass
    ({0: 4, 1: 2, 2: 3, 3: 4}, 0.7, SLOW, dict.fromkeys(range(4), 2)),
    ({0: 4, 1: 4}, 0.7, SLOW, {0: 4, 1: 4}),              # already one pass
    ({0: 4, 1: 1}, 0.95, PASS, {0: 1, 1: 1}),  # a second pass for 3 more: not worth it
    ({0: 4, 1: 0}, 0.95, PASS, {0: 4, 1: 0}),  # 4 nearly sure tokens are worth a pass
    ({0: 4, 1: 0}, 0.3, PASS, {0: 0, 1: 0}),              # rarely right: one pass
    ({0: 2}, 0.0, PASS, {0: 0}),                          # never right: not worth its rows
    ({0: 0, 1: 0}, 0.5, PASS, {0: 0, 1: 0}),
    ({}, 0.5, PASS, {}),
])
def test_cut_drafts(lengths: dict[int, int], acceptance: float, ubatch_s: float,
                    expected: dict[int, int]) -> None:
    assert cut_drafts(lengths, dict.fromkeys(lengths, acceptance), ROW, ubatch_s) == expected


def test_cut_drafts_weighs_each_streams_own_acceptance() -> None:
    lengths = {0: 4, 1: 0}
    # slot 0 repeats its context, slot 1 does not: the pass is worth slot 0's sure drafts
    assert cut_drafts(lengths, {0: 0.95, 1: 0.1}, ROW, PASS) == {0: 4, 1: 0}
    assert cut_drafts(lengths, {0: 0.1, 1: 0.95}, ROW, PASS) == {0: 0, 1: 0}


@pytest.mark.parametrize("acceptance", [0.0, 0.3, 0.6, 0.9, 1.0])
def test_cut_drafts_only_shortens(acceptance: float) -> None:
    lengths = {0: 5, 1: 0, 2: 2, 3: 7, 5: 1, 6: 3}
    cut = cut_drafts(lengths, dict.fromkeys(lengths, acceptance), ROW, SLOW)
    assert cut.keys() == lengths.keys()
    assert all(0 <= cut[s] <= lengths[s] for s in lengths)
    assert len({n for s, n in cut.items() if n < lengths[s]}) <= 1  # one common cut


def test_tuner_counts_each_pass_as_a_round_trip() -> None:
    tuner = DraftTuner(rtt_s=0.04, k_max=8)
    tuner.observe(wall_s=3 * (0.04 + STEP * 5 / 6) + 10 * STEP / 6, rows=10, passes=3)
    assert tuner.step_s == pytest.approx(STEP)


@pytest.mark.parametrize(("shapes", "expected"), [
    ([(1, 1), (1, 8), (2, 9), (1, 4)], (0.006, 0.018)),  # a CPU: rows dear
    ([(1, 8), (1, 16), (3, 24)], (0.040, 0.001)),        # a GPU or a slow link: passes dear
    ([(1, 8)] * 5, None),                                # one shape: pass and row unknown
    ([(1, 2), (2, 4), (3, 6)], None),                    # rows in step with passes
])
def test_cost_fit(shapes: list[tuple[int, int]],
                  expected: tuple[float, float] | None) -> None:
    fit = CostFit()
    true_pass, true_row = expected or (0.01, 0.01)
    for passes, rows in shapes:
        fit.add(passes, rows, passes * true_pass + rows * true_row)
    split = fit.split()
    if expected is None:
        assert split is None
    else:
        assert split is not None and split == pytest.approx(expected)


def test_cost_fit_remembers_the_share_it_last_told_apart() -> None:
    fit = CostFit()
    assert fit.row_share == ROW_SHARE
    for passes, rows in [(1, 1), (1, 9)]:
        fit.add(passes, rows, 0.001 + rows * 0.019)
    assert fit.row_share == pytest.approx(0.95)
    for _ in range(200):  # one shape only, long after: the fit cannot tell, the share stays
        fit.add(1, 1, 0.020)
    assert fit.split() is None and fit.row_share == pytest.approx(0.95, abs=0.01)
    tuner = DraftTuner(rtt_s=0.0, k_max=8, step_s=0.02, fit=fit)
    assert tuner.row_s == pytest.approx(0.019, abs=0.0005)
    assert tuner.length(1, 0.9) == 0  # so no draft is asked for that rows this dear ruin


@pytest.mark.parametrize(("rtt_s", "acceptance", "drafts"), [
    (0.0, 0.9, False),   # loopback: a draft leaves the one-row path for the dearer one
    (0.0, 0.99, True),   # unless it is nearly always kept
    (0.02, 0.9, True),   # a round trip to share makes it pay
])
def test_a_one_row_step_is_timed_apart(rtt_s: float, acceptance: float, drafts: bool) -> None:
    tuner = DraftTuner(rtt_s=rtt_s, k_max=8)
    # this CPU's batch-invariant kernels, one sequence: 1 row 18.8 ms, 2 rows 47, ...
    for _ in range(3):
        for rows, ms in [(1, 18.8), (2, 47.0), (3, 56.0), (5, 94.8), (9, 130.3)]:
            tuner.observe(wall_s=rtt_s + ms / 1000, rows=rows)
    assert tuner.single_s == pytest.approx(0.0188)
    assert (tuner.length(1, acceptance) > 0) is drafts


def test_cost_fit_never_goes_below_zero() -> None:
    fit = CostFit()
    fit.add(1, 1, 0.010)  # two rows cost three times one (seen on this CPU): the line
    fit.add(1, 2, 0.030)  # through them has a negative pass; a step is all rows then
    split = fit.split()
    assert split is not None and split[0] == 0.0 and split[1] == pytest.approx(0.014, rel=0.01)


def test_tuner_uses_the_fitted_costs_and_a_nominal_step_before_any() -> None:
    tuner = DraftTuner(rtt_s=0.0, k_max=8)
    assert tuner.row_s == pytest.approx(ROW_SHARE * NOMINAL_STEP_S)
    for rows in (1, 2, 1, 3, 1, 2):  # a CPU: each row three times a pass
        tuner.observe(wall_s=0.005 + rows * 0.015, rows=rows)
    assert tuner.pass_s == pytest.approx(0.005) and tuner.row_s == pytest.approx(0.015)
    assert tuner.step_s == pytest.approx(0.02)
    assert tuner.length(1, 0.7) == 0  # a fair drafter does not pay for rows that dear


@pytest.mark.parametrize(("draft", "emitted", "scores", "idle"), [
    ([5, 6, 7], [[5], [6], [7]], [(0, 0), (0, 0), (3, 0)], True),   # scored once, at its end
    ([5, 6, 7], [[5], [9], [7]], [(0, 0), (1, 1), (0, 0)], True),   # cut at the second
    ([5, 6, 7], [[5, 6, 7, 8]], [(3, 0)], True),                    # a verified run of four
    ([5, 6, 7], [[5, 6]], [(0, 0)], False),                         # one still to come
    ([5], [[4, 5]], [(0, 1)], True),
])
def test_shadow_drafts(draft: list[int], emitted: list[list[int]],
                       scores: list[tuple[int, int]], idle: bool) -> None:
    shadows = ShadowDrafts()
    shadows.start(3, draft)
    assert [shadows.emitted(3, tokens) for tokens in emitted] == scores
    assert shadows.idle(3) is idle and shadows.emitted(4, [5]) == (0, 0)


@pytest.mark.parametrize(("measured", "stages", "expected"), [
    ({"w2": 20.0}, ["w2"], 0.020),
    ({"w2": 20.0, "w3": 5.0}, ["w2", "w3"], 0.025),  # the head is a star: they add up
    ({"w2": 20.0, "w3": 5.0}, ["w3"], 0.005),
    ({"w2": 20.0}, ["w2", "w9"], 0.040),            # unmeasured: as the slowest known
    ({}, ["w2"], 0.0),
    ({"w2": 20.0}, [], 0.0),                       # a whole model
])
def test_step_round_trip(measured: dict[str, float], stages: list[str], expected: float) -> None:
    assert step_round_trip_s(measured, stages) == pytest.approx(expected)
