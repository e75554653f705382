"""The mesh status: built from a snapshot, and its JSON form both ways."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from meshllm.cli.ready import all_models_decided, progress_line
from meshllm.cli.status_cmd import render
from meshllm.common.errors import InvalidRecord
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.status import MeshStatus, ServingState, mesh_status
from meshllm.common.types import (
    Assignment,
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

M = ModelId("m1")
W1, W2 = WorkerId("w1"), WorkerId("w2")


def spec(model_id: ModelId = M) -> ModelSpec:
    return ModelSpec(model_id, f"/models/{model_id}.gguf", 300, 18, 2048, 64, "gemma3", 32768)


def worker(worker_id: WorkerId, *models: ModelState, **rtt: float) -> WorkerInfo:
    return WorkerInfo(worker_id, f"{worker_id}:5000", "cpu", 1 << 30, 4, 0.0, models,
                      {WorkerId(k): v for k, v in rtt.items()})


def snapshot(workers: tuple[WorkerInfo, ...] = (), specs: tuple[ModelSpec, ...] = (),
             placements: tuple[Placement, ...] = ()) -> MeshSnapshot:
    return MeshSnapshot({w.worker_id: w for w in workers}, {s.model_id: s for s in specs},
                        {p.model_id: p for p in placements})


SPLIT = Replica((Assignment(W1, 0, 10), Assignment(W2, 10, 18)))
CASES: dict[str, tuple[MeshSnapshot, ServingState, str, int]] = {
    "empty mesh": (snapshot(), ServingState.WAITING, "", 0),
    "waiting for the planner": (
        snapshot((worker(W1),), (spec(),)), ServingState.WAITING, "waiting for the planner", 0),
    "loading": (
        snapshot((worker(W1, ModelState(M, LoadState.LOADING, phase="loading weights",
                                        progress=0.41666)),),
                 (spec(),), (Placement(M, (whole(W1, 18),), 400),)),
        ServingState.LOADING, "loading", 0),
    "split replica": (
        snapshot((worker(W1, ModelState(M, LoadState.READY), w2=0.25),
                  worker(W2, ModelState(M, LoadState.READY), w1=0.5)),
                 (spec(),), (Placement(M, (SPLIT,), 400),)),
        ServingState.SERVING, "serving", 1),
    "unplaced with reason": (
        snapshot((worker(W1),), (spec(),),
                 (Placement(M, (), 400, "needs 400 B, the largest worker has 300 B"),)),
        ServingState.NOT_SERVED, "not served: needs 400 B, the largest worker has 300 B", 0),
    "failed stage and a stage whose worker left": (
        snapshot((worker(W1, ModelState(M, LoadState.FAILED, "out of memory", 2)),),
                 (spec(),), (Placement(M, (SPLIT,), 400),)),
        ServingState.LOADING, "loading", 0),
}


@pytest.mark.parametrize("case", CASES)
def test_status_round_trips_through_json(case: str) -> None:
    status = mesh_status(CASES[case][0])
    document = json.loads(json.dumps(status.to_json()))
    assert MeshStatus.from_json(document) == status
    assert MeshStatus.from_json(document).to_json() == document


@pytest.mark.parametrize("case", [c for c in CASES if c != "empty mesh"])
def test_model_state_and_its_text(case: str) -> None:
    snap, state, text, ready = CASES[case]
    (model,) = mesh_status(snap).models
    assert (model.state, model.status_text, model.ready_replicas) == (state, text, ready)
    assert model.decided is (state in (ServingState.SERVING, ServingState.NOT_SERVED))
    document = mesh_status(snap).to_json()["models"][0]
    assert (document["state"], document["status"], document["ready_replicas"]) == (
        state.value, text, ready)


def test_split_replica_json_keeps_the_documented_shape() -> None:
    document = mesh_status(CASES["split replica"][0]).to_json()
    ready = {"state": "ready", "error": "", "phase": "", "progress": 0.0}
    assert document["nodes"][0] == {
        "worker_id": "w1", "address": "w1:5000", "backend": "cpu",
        "memory_budget_bytes": 1 << 30, "threads": 4, "rtt_ms": {"w2": 0.25},
        "models": {"m1": {**ready, "engine_restarts": 0, "draining": False, "running": 0,
                          "queued": 0, "slots": 0}}}
    assert document["models"] == [{
        "model_id": "m1", "source": "/models/m1.gguf", "n_layers": 18,
        "context_length": 2048, "weights_bytes": 300, "required_bytes": 400,
        "replicas": [{"worker_id": "w1", "state": "ready", "split": True, "retiring": False,
                      "stages": [{"worker_id": "w1", "layers": [0, 10], **ready},
                                 {"worker_id": "w2", "layers": [10, 18], **ready}],
                      "link_rtt_ms": {"w2": 0.25}}],
        "ready_replicas": 1, "status": "serving", "state": "serving", "unplaced_reason": ""}]


def test_a_stage_whose_worker_left_is_absent() -> None:
    status = mesh_status(CASES["failed stage and a stage whose worker left"][0])
    (replica,) = status.models[0].replicas
    assert [s.state for s in replica.stages] == [LoadState.FAILED, None]
    assert replica.stages[0].error == "out of memory"
    assert replica.link_rtt_ms == {W2: None}
    stages = status.to_json()["models"][0]["replicas"][0]["stages"]
    assert [s["state"] for s in stages] == ["failed", "absent"]


def _set(document: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value


@pytest.mark.parametrize(("path", "value", "named"), [
    (("nodes",), KeyError, "field nodes: missing"),
    (("models",), {}, "field models: expected a list"),
    (("nodes", 0, "threads"), "4", "nodes[0].threads: expected an integer"),
    (("nodes", 0, "rtt_ms", "w2"), None, "nodes[0].rtt_ms.w2: expected a number"),
    (("nodes", 0, "models", "m1", "state"), "sleeping", "nodes[0].models.m1.state"),
    (("models", 0, "state"), "serving-ish", "models[0].state: unknown value"),
    (("models", 0, "required_bytes"), True, "models[0].required_bytes"),
    (("models", 0, "replicas", 0, "stages"), [], "models[0].replicas[0].stages"),
    (("models", 0, "replicas", 0, "stages", 1, "layers"), [10], "stages[1].layers"),
    (("models", 0, "replicas", 0, "stages", 0, "progress"), "1", "stages[0].progress"),
    (("models", 0), [], "field models[0]: expected an object"),
])
def test_malformed_documents_name_the_field(path: tuple[str | int, ...], value: object,
                                            named: str) -> None:
    document = copy.deepcopy(mesh_status(CASES["split replica"][0]).to_json())
    _set(document, path, value)
    with pytest.raises(InvalidRecord, match=named.replace("[", r"\[").replace("]", r"\]")):
        MeshStatus.from_json(document)


def test_a_document_that_is_not_an_object() -> None:
    with pytest.raises(InvalidRecord, match="status document"):
        MeshStatus.from_json([])


def test_the_launcher_waits_until_every_model_is_decided() -> None:
    loading = mesh_status(CASES["loading"][0])
    assert progress_line(loading) == "m1: loading (w1 loading weights 42%)"
    assert progress_line(mesh_status(snapshot())) == "waiting for the planner"
    assert not all_models_decided(loading, 1)
    assert all_models_decided(mesh_status(CASES["split replica"][0]), 1)
    assert all_models_decided(mesh_status(CASES["unplaced with reason"][0]), 1)
    assert not all_models_decided(mesh_status(CASES["unplaced with reason"][0]), 2)


def test_a_refusal_counts_only_once_every_worker_up_started_has_registered() -> None:
    refused = mesh_status(CASES["unplaced with reason"][0])        # one worker registered
    assert not all_models_decided(refused, 1, workers=2)             # the other may still fit
    assert all_models_decided(refused, 1, workers=1)
    serving = mesh_status(CASES["split replica"][0])
    assert all_models_decided(serving, 1, workers=5)                 # serving is serving
    failed = mesh_status(CASES["failed stage and a stage whose worker left"][0])
    assert progress_line(failed) == "m1: loading (w1 failed, w2 absent)"


def test_a_retiring_replica_is_shown_and_not_counted_ready() -> None:
    retiring = Replica((Assignment(W2, 0, 18),), retiring=True)
    mesh = snapshot((worker(W1, ModelState(M, LoadState.READY, running=2, slots=4)),
                     worker(W2, ModelState(M, LoadState.READY, draining=True, running=1,
                                           slots=4))),
                    (spec(),), (Placement(M, (whole(W1, 18), retiring), 400),))
    status = mesh_status(mesh)
    assert status.models[0].ready_replicas == 1
    document = status.to_json()
    assert [r["retiring"] for r in document["models"][0]["replicas"]] == [False, True]
    assert document["nodes"][1]["models"]["m1"]["draining"] is True
    assert MeshStatus.from_json(json.loads(json.dumps(document))) == status
    text = render(status)
    assert "retiring" in text and "draining 1/4 slots" in text and "ready 2/4 slots" in text
