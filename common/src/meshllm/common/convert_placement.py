"""Protobuf conversion of placements: which workers hold which share of a model, as
whole replicas, split ones (stages) or expert shards.

Part of `convert` (which re-exports these), kept apart for size; like it, parsing
validates and raises InvalidRecord.
"""

from __future__ import annotations

from meshllm.common import convert_moe
from meshllm.common.errors import InvalidRecord
from meshllm.common.types import Assignment, ModelId, Placement, Replica, WorkerId
from meshllm.v1 import mesh_pb2


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidRecord(what)


def placement_to_pb(p: Placement) -> mesh_pb2.Placement:
    return mesh_pb2.Placement(
        model_id=p.model_id,
        replicas=[
            mesh_pb2.Replica(stages=[
                mesh_pb2.Assignment(worker_id=a.worker_id, layer_start=a.layer_start,
                                    layer_end=a.layer_end)
                for a in r.stages
            ], retiring=r.retiring, experts=convert_moe.selection_to_pb(r.experts))
            for r in p.replicas
        ],
        unplaced_reason=p.unplaced_reason, required_bytes=p.required_bytes,
        expert_deal=convert_moe.deal_to_pb(p.expert_deal) if p.expert_deal else None,
    )


def _replica_from_pb(model_id: str, r: mesh_pb2.Replica) -> Replica:
    stages: list[Assignment] = []
    for a in r.stages:
        _require(bool(a.worker_id), f"placement {model_id}: stage without worker")
        _require(a.layer_start < a.layer_end, f"placement {model_id}: empty layer range")
        if stages:
            _require(a.layer_start == stages[-1].layer_end,
                     f"placement {model_id}: stages are not contiguous")
        stages.append(Assignment(WorkerId(a.worker_id), a.layer_start, a.layer_end))
    _require(bool(stages), f"placement {model_id}: replica without stages")
    _require(stages[0].layer_start == 0, f"placement {model_id}: head does not start at 0")
    _require(len({s.worker_id for s in stages}) == len(stages),
             f"placement {model_id}: a worker holds two stages of one replica")
    experts = convert_moe.selection_from_pb(model_id, r.experts)
    _require(not experts or len(stages) == 1, f"placement {model_id}: a split expert shard")
    return Replica(tuple(stages), r.retiring, experts)


def placement_from_pb(m: mesh_pb2.Placement) -> Placement:
    _require(bool(m.model_id), "placement without model_id")
    replicas = tuple(_replica_from_pb(m.model_id, r) for r in m.replicas)
    deal = convert_moe.deal_from_pb(m.model_id, m.expert_deal) \
        if m.HasField("expert_deal") else None
    return Placement(ModelId(m.model_id), replicas, m.required_bytes, m.unplaced_reason, deal)
