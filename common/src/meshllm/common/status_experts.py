"""The status of a mixture-of-experts model served by expert shards: which experts each
shard holds, how many copies of the rarest expert the shards hold together (coverage),
and how the deal was ranked. Part of the mesh status (status.py), kept apart for size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshllm.common.errors import InvalidRecord
from meshllm.common.moe import ExpertSelection, expert_list, layer_runs
from meshllm.common.types import ModelSpec, Placement, WorkerId, WorkerInfo


@dataclass(frozen=True)
class ShardExperts:
    worker_id: WorkerId
    experts: ExpertSelection  # per MoE layer

    @property
    def summary(self) -> str:
        return summarise(self.experts)


@dataclass(frozen=True)
class ExpertStatus:
    expert_count: int
    moe_layers: int
    shards: tuple[ShardExperts, ...]
    coverage: int            # copies of the rarest expert over the shards (0: some missing)
    calibration_tokens: int  # 0: no calibration, an even deal
    hot_share: float         # share of each shard's experts on every shard
    why: str = ""            # why the planner chose expert shards

    @property
    def ranking(self) -> str:
        if self.calibration_tokens:
            return f"calibrated with {self.calibration_tokens} tokens"
        return "even deal, no calibration"


def summarise(selection: ExpertSelection) -> str:
    """`layers 0-2: 0-4,6` per run of layers holding the same experts; a long list as
    its count and first ranges."""
    return "; ".join(f"{layers}: {expert_list(experts)}"
                     for layers, experts in layer_runs(selection))


def _coverage(shards: Sequence[ShardExperts], expert_count: int, layers: int) -> int:
    if not shards:
        return 0
    return min(sum(e in s.experts[layer] for s in shards)
               for layer in range(layers) for e in range(expert_count))


def expert_status(spec: ModelSpec, placement: Placement | None,
                  workers: Mapping[WorkerId, WorkerInfo]) -> ExpertStatus | None:
    """The model's expert shards as placed (None: it is not served by expert shards);
    coverage counts the shards whose worker is in the mesh and that take requests."""
    if spec.moe is None or placement is None or placement.expert_deal is None:
        return None
    placed = [r for r in placement.replicas if r.is_shard]
    shards = tuple(ShardExperts(r.head.worker_id, r.experts) for r in placed)
    live = [ShardExperts(r.head.worker_id, r.experts) for r in placed
            if r.head.worker_id in workers and not r.retiring]
    deal = placement.expert_deal
    return ExpertStatus(spec.moe.expert_count, spec.moe.moe_layers, shards,
                        _coverage(live, spec.moe.expert_count, spec.moe.moe_layers),
                        deal.calibration_tokens, deal.hot_share, deal.why)


def expert_status_json(s: ExpertStatus) -> dict[str, Any]:
    return {"expert_count": s.expert_count, "moe_layers": s.moe_layers,
            "coverage": s.coverage, "ranking": s.ranking,
            "calibration_tokens": s.calibration_tokens, "hot_share": s.hot_share,
            "why": s.why,
            "shards": [{"worker_id": x.worker_id, "experts": [list(layer) for layer in
                                                              x.experts],
                        "summary": x.summary} for x in s.shards]}


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRecord(f"status field experts.{key}: expected {kind}, got {value!r:.40}")
    return value


def _selection(value: object) -> ExpertSelection:
    if not isinstance(value, list) or not all(
            isinstance(layer, list) and all(type(e) is int for e in layer) for layer in value):
        raise InvalidRecord(f"status field experts.shards[].experts: expected lists of "
                            f"expert indices, got {value!r:.40}")
    return tuple(tuple(layer) for layer in value)


def expert_status_from_json(data: object) -> ExpertStatus | None:
    """The expert status in a model's JSON (None: absent, or a gateway from before it)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InvalidRecord("status field experts: expected an object")
    shards = tuple(ShardExperts(WorkerId(_field(x, "worker_id", str)),
                                _selection(x.get("experts")))
                   for x in _field(data, "shards", list) if isinstance(x, dict))
    return ExpertStatus(_field(data, "expert_count", int), _field(data, "moe_layers", int),
                        shards, _field(data, "coverage", int),
                        _field(data, "calibration_tokens", int),
                        float(_field(data, "hot_share", (int, float))), _field(data, "why", str))
