"""Table-driven tests of splitting a model's layers across workers."""

from __future__ import annotations

import pytest
from meshllm.common.types import ModelId, ModelSpec, WorkerId, WorkerInfo
from meshllm.planner.place import MiB, PlacementPolicy, place
from meshllm.planner.split import proportional

# 10 layers of 10 MiB, 20 MiB of embeddings/output, no KV cache, no overheads: a worker
# with B MiB can head (B - 20) / 10 layers and stage B / 10 layers.
POLICY = PlacementPolicy(engine_overhead_bytes=0, stage_overhead_bytes=0, max_link_rtt_ms=80)


def model(force_split: bool = False) -> ModelSpec:
    return ModelSpec(ModelId("m"), "m", 120 * MiB, 10, 1, 0, "llama", 1, 20 * MiB,
                     (10 * MiB,) * 10, force_split)


def worker(name: str, mib: int, **rtt: float) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", mib * MiB, 1, 0.0, (), rtt)


def stages(workers: list[WorkerInfo], force: bool = False) -> list[tuple[str, int, int]]:
    placement = place([model(force)], workers, policy=POLICY)[ModelId("m")]
    return [(a.worker_id, a.layer_start, a.layer_end)
            for r in placement.replicas[:1] for a in r.stages]


CASES = [
    ("fits whole: no split",
     [worker("a", 200), worker("b", 200)], False, [("a", 0, 10)]),
    ("two workers needed, proportional to room",
     [worker("a", 80), worker("b", 90)], False, [("b", 0, 5), ("a", 5, 10)]),
    ("fewest workers: one big stage beats two small",
     [worker("a", 70), worker("b", 30), worker("c", 30), worker("d", 100)], False,
     [("d", 0, 5), ("a", 5, 10)]),
    ("lowest latency stage preferred among equals",
     [worker("h", 70), worker("far", 60, h=30.0), worker("near", 60, h=1.0)], False,
     [("h", 0, 5), ("near", 5, 10)]),
    ("links above the threshold are skipped",
     [worker("h", 70, slow=120.0), worker("slow", 200), worker("ok", 40, h=5.0)], False,
     [("slow", 0, 10)]),
    ("three stages when two are not enough",
     [worker("a", 60), worker("b", 40), worker("c", 40)], False,
     [("a", 0, 4), ("b", 4, 7), ("c", 7, 10)]),
    ("forced split although one worker holds it",
     [worker("a", 300), worker("b", 300)], True, [("a", 0, 5), ("b", 5, 10)]),
    ("impossible: total room too small",
     [worker("a", 50), worker("b", 30)], False, []),
    ("workers too small to head can still be stages",
     [worker("a", 15), worker("b", 15), worker("c", 100)], False, [("c", 0, 8), ("a", 8, 9),
                                                                   ("b", 9, 10)]),
    ("impossible: only one worker for a forced split",
     [worker("a", 500)], True, []),
    ("ties broken by worker id",
     [worker("y", 70), worker("x", 70)], False, [("x", 0, 4), ("y", 4, 10)]),
]


@pytest.mark.parametrize(("workers", "force", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_split(workers: list[WorkerInfo], force: bool,
               expected: list[tuple[str, int, int]]) -> None:
    assert stages(workers, force) == expected


def test_unknown_latency_counts_as_allowed() -> None:
    assert len(stages([worker("a", 80), worker("b", 90)])) == 2


def test_unplaced_split_reason_names_the_threshold() -> None:
    placement = place([model()], [worker("a", 50), worker("b", 30)], policy=POLICY)
    assert "no split over links under 80 ms" in placement[ModelId("m")].unplaced_reason


def test_split_model_gets_no_extra_replicas() -> None:
    workers = [worker("a", 80), worker("b", 90), worker("c", 80), worker("d", 90)]
    assert len(place([model()], workers, policy=POLICY)[ModelId("m")].replicas) == 1


def test_split_stages_use_up_memory_for_other_models() -> None:
    other = ModelSpec(ModelId("small"), "s", 50 * MiB, 2, 1, 0, "llama", 1)
    workers = [worker("a", 80), worker("b", 90)]
    result = place([model(), other], workers, policy=POLICY)
    assert result[ModelId("small")].unplaced_reason  # the split left too little for it


@pytest.mark.parametrize(("total", "rooms", "expected"), [
    (10, [5, 5], [5, 5]),
    (10, [3, 100], [1, 9]),
    (10, [3, 7], [3, 7]),
    (3, [10, 10, 10], [1, 1, 1]),
    (7, [2, 10], [1, 6]),
    (18, [4, 26], [2, 16]),
])
def test_proportional(total: int, rooms: list[int], expected: list[int]) -> None:
    counts = proportional(total, rooms)
    assert counts == expected
    assert sum(counts) == total and all(1 <= c <= r for c, r in zip(counts, rooms, strict=True))
