"""The status of a model served by expert shards: experts per shard (summarised per run of
layers), coverage over the live shards, how the deal was ranked; JSON both ways; the
`mesh-llm status` lines."""

from __future__ import annotations

import json

import pytest
from meshllm.cli.status_cmd import render
from meshllm.common.errors import InvalidRecord
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.moe import MoeLayout
from meshllm.common.status import MeshStatus, mesh_status
from meshllm.common.status_experts import summarise
from meshllm.common.types import (
    ExpertDeal,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)

M = ModelId("moe")
LAYOUT = MoeLayout("llama", 8, 2, 3, 1000, 100, 10, 0)
SPEC = ModelSpec(M, "/m/moe.gguf", 1800, 3, 512, 8, "llama", 512, moe=LAYOUT)
A = ((0, 1, 2, 3, 4),) * 3
B = ((0, 1, 5, 6, 7),) * 3
C = ((1, 2, 3, 4, 5, 6, 7), (0, 2, 3, 4, 5, 6, 7), (1, 2, 3, 4, 5, 6, 7))


def worker(name: str) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), f"{name}:1", "cpu", 1 << 30, 1, 0.0,
                      (ModelState(M, LoadState.READY),))


def shard(name: str, experts: tuple[tuple[int, ...], ...]) -> Replica:
    return Replica(whole(WorkerId(name), 3).stages, experts=experts)


def snapshot(deal: ExpertDeal, *names: str) -> MeshSnapshot:
    placement = Placement(M, (shard("a", A), shard("b", B), shard("c", C)), 2000, "", deal)
    return MeshSnapshot({WorkerId(n): worker(n) for n in names}, {M: SPEC}, {M: placement})


@pytest.mark.parametrize(("selection", "text"), [
    (((0, 1, 2, 4),) * 3, "layers 0-2: 0-2,4"),
    (((0, 1), (0, 1), (5,)), "layers 0-1: 0-1; layer 2: 5"),
    ((tuple(range(0, 128, 2)),), "layer 0: 64 experts (0,2,4,6,8,10,12,14,16,18,20,22,24,26,"
                                 "28,30,32,34...)"),
])
def test_summaries(selection: tuple[tuple[int, ...], ...], text: str) -> None:
    assert summarise(selection) == text


def test_status_shows_the_shards_coverage_and_ranking() -> None:
    status = mesh_status(snapshot(ExpertDeal(0.4, 2048, "3 expert shards"), "a", "b", "c"))
    experts = status.models[0].experts
    assert experts is not None
    assert [s.worker_id for s in experts.shards] == ["a", "b", "c"]
    assert experts.coverage == 2  # every expert on two of the three
    assert experts.ranking == "calibrated with 2048 tokens"
    text = render(status)
    assert "coverage 2" in text and "calibrated with 2048 tokens" in text
    assert "c                layer 0: 1-7; layer 1: 0,2-7; layer 2: 1-7" in text


def test_coverage_counts_only_live_shards_and_an_even_deal_says_so() -> None:
    status = mesh_status(snapshot(ExpertDeal(0.0, 0, ""), "a", "b"))
    experts = status.models[0].experts
    assert experts is not None and experts.coverage == 1
    assert experts.ranking == "even deal, no calibration"
    status = mesh_status(snapshot(ExpertDeal(0.0, 0, ""), "a"))
    assert status.models[0].experts is not None and status.models[0].experts.coverage == 0
    assert "some expert is on no live shard" in render(status)


def test_expert_status_round_trips_through_json() -> None:
    status = mesh_status(snapshot(ExpertDeal(0.4, 2048, "why"), "a", "b", "c"))
    doc = json.loads(json.dumps(status.to_json()))
    assert doc["models"][0]["experts"]["shards"][0]["summary"] == "layers 0-2: 0-4"
    assert MeshStatus.from_json(doc) == status


def test_a_dense_model_has_no_expert_status() -> None:
    dense = MeshSnapshot({}, {M: SPEC}, {M: Placement(M, (whole(WorkerId("a"), 3),), 1)})
    assert mesh_status(dense).models[0].experts is None
    assert "experts" not in mesh_status(dense).to_json()["models"][0]


def test_malformed_expert_status_is_refused() -> None:
    doc = mesh_status(snapshot(ExpertDeal(0.4, 1, ""), "a")).to_json()
    doc["models"][0]["experts"]["shards"][0]["experts"] = [["x"]]
    with pytest.raises(InvalidRecord, match="experts"):
        MeshStatus.from_json(doc)
