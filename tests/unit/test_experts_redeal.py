"""Table-driven tests of dealing an expert-sharded model again when its ranking changes
(planner/experts.py ranking_moved, inside a planning round), and of not dealing it again
otherwise: each re-deal reloads every shard."""

from __future__ import annotations

import dataclasses

import pytest
from meshllm.common.moe import ExpertRanking
from meshllm.common.types import (
    ExpertDeal,
    ModelDeclaration,
    ModelId,
    Placement,
    WorkerId,
)
from meshllm.planner.assign import RoundInputs, RoundPolicy, next_placements
from meshllm.planner.experts import grow_shards, plan_shards, ranking_moved
from meshllm.planner.place import PlacementPolicy

from tests.unit.test_experts_deal import (
    LAYERS,
    LAYOUT,
    SKEWED,
    SPEC,
    budget,
    ranking,
    shards,
    worker,
)

SKEWED_ORDERS = [SKEWED.layer_order(layer) for layer in range(LAYERS)]
RESKEWED = ranking([list(reversed(o)) for o in SKEWED_ORDERS])  # same tokens, other hot sets
RECOUNTED = ranking([list(o) for o in SKEWED_ORDERS], tokens=5000)  # another calibration
COLD_MOVED = ranking([[*o[:4], *reversed(o[4:])] for o in SKEWED_ORDERS])  # hot set the same


def _placed(rank: ExpertRanking | None, sizes: list[int], grow: list[int] | None = None
            ) -> tuple[list[tuple[tuple[int, ...], ...]], ExpertDeal]:
    free = {WorkerId(f"w{i}"): budget(k) for i, k in enumerate(sizes)}
    plan = shards(plan_shards(SPEC, free, 0, rank))
    placed = list(plan.shards)
    if grow:
        newcomers = {WorkerId(f"n{i}"): budget(k) for i, k in enumerate(grow)}
        placed += grow_shards(SPEC, placed, {**{w: 0 for w in free}, **newcomers}, 0, rank)
    return [r.experts for r in placed], plan.deal


MOVES = [
    # (description, ranking dealt by, sizes, grown by, ranking now, dealt again)
    ("even deal, no ranking yet", None, [5, 5], None, None, False),
    ("even deal, a ranking arrives", None, [5, 5], None, SKEWED, True),
    ("dealt by the ranking published", SKEWED, [5, 5], None, SKEWED, False),
    ("dealt by it, then a shard grown beside them", SKEWED, [6, 6], [6], SKEWED, False),
    ("three shards dealt by it", SKEWED, [6, 6, 6], None, SKEWED, False),
    ("another calibration: other tokens", SKEWED, [5, 5], None, RECOUNTED, True),
    ("same tokens, other hot experts", SKEWED, [5, 5], None, RESKEWED, True),
    ("same tokens, other hot experts, grown shards", SKEWED, [6, 6], [6], RESKEWED, True),
    ("same tokens and hot experts, only the cold ones reordered", SKEWED, [5, 5], None,
     COLD_MOVED, False),
    ("the ranking is gone: the shards stay", SKEWED, [5, 5], None, None, False),
    ("a ranking of another shape: the shards stay", SKEWED, [5, 5], None,
     ExpertRanking(SPEC.model_digest, ((1, 2, 3),) * LAYERS, 100, 0.1), False),
]


@pytest.mark.parametrize(("dealt_by", "sizes", "grow", "now", "again"),
                         [c[1:] for c in MOVES], ids=[c[0] for c in MOVES])
def test_ranking_moved(dealt_by: ExpertRanking | None, sizes: list[int],
                       grow: list[int] | None, now: ExpertRanking | None, again: bool) -> None:
    selections, dealt = _placed(dealt_by, sizes, grow)
    assert ranking_moved(LAYOUT, selections, dealt, now) is again


def test_a_calibrated_model_is_dealt_again_once_when_its_ranking_changes() -> None:
    declared = ModelDeclaration(SPEC.model_id, SPEC.source)
    workers = {WorkerId(w): worker(w, budget(5)) for w in ("a", "b")}
    policy = RoundPolicy(PlacementPolicy(engine_overhead_bytes=0))
    inputs = RoundInputs({SPEC.model_id: SPEC}, {SPEC.model_id: declared}, workers, {}, {}, 0.0,
                         rankings={SPEC.model_digest: SKEWED})

    def after(published: dict[ModelId, Placement], rank: ExpertRanking
              ) -> dict[ModelId, Placement]:
        return next_placements(dataclasses.replace(
            inputs, published=published, rankings={SPEC.model_digest: rank}), policy).placements

    first = next_placements(inputs, policy).placements
    assert after(first, SKEWED) == first  # the same ranking: left alone
    moved = after(first, RESKEWED)
    assert moved[SPEC.model_id].replicas != first[SPEC.model_id].replicas
    assert [r.head.worker_id for r in moved[SPEC.model_id].replicas] == ["a", "b"]
    assert after(moved, RESKEWED) == moved  # dealt once by the new ranking, then stable
    recounted = after(first, RECOUNTED)  # same order, other tokens: the same experts
    assert recounted[SPEC.model_id].replicas == first[SPEC.model_id].replicas
    assert recounted[SPEC.model_id].expert_deal.calibration_tokens == 5000  # type: ignore[union-attr]
    assert after(recounted, RECOUNTED) == recounted


def test_shards_grown_beside_a_calibrated_deal_are_not_dealt_again() -> None:
    declared = ModelDeclaration(SPEC.model_id, SPEC.source)
    two = {WorkerId(w): worker(w, budget(6)) for w in ("a", "b")}
    policy = RoundPolicy(PlacementPolicy(engine_overhead_bytes=0))
    inputs = RoundInputs({SPEC.model_id: SPEC}, {SPEC.model_id: declared}, two, {}, {}, 0.0,
                         rankings={SPEC.model_digest: SKEWED})
    first = next_placements(inputs, policy).placements
    three = dataclasses.replace(inputs, published=first,
                                workers={**two, WorkerId("c"): worker("c", budget(6))})
    grown = next_placements(three, policy).placements
    assert len(grown[SPEC.model_id].replicas) == 3
    later = next_placements(dataclasses.replace(three, published=grown), policy).placements
    assert later == grown
