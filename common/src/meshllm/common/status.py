"""The mesh status: what the gateway serves at /api/status, what `mesh-llm status` prints
and what `mesh-llm up` waits on.

`mesh_status` builds it from a snapshot (pure); `MeshStatus.to_json` / `from_json` are its
one JSON form. Fields that follow from others (a model's `status` text and
`ready_replicas`, a replica's `worker_id`, `state` and `split`, a suspect's `left_out`) are
written for readers of the JSON and recomputed, not trusted, when a document is parsed.
Expert shards (status_experts.py), suspect workers (status_suspects.py) and the field
reader (status_fields.py) are modules of their own, for size.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshllm.common.demand import ModelDemand
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.status_experts import (
    ExpertStatus,
    expert_status,
    expert_status_from_json,
    expert_status_json,
)
from meshllm.common.status_fields import Fields
from meshllm.common.status_suspects import (
    SuspectStatus,
    suspect_status,
    suspects_from_json,
    suspects_json,
)
from meshllm.common.types import LoadState, ModelId, ModelSpec, Placement, Replica, WorkerId

ABSENT = "absent"  # a stage's state when its worker is not in the mesh (JSON only)


class ServingState(enum.Enum):
    """Where a model stands, as a client sees it."""

    WAITING = "waiting"        # the planner has not decided yet
    NOT_SERVED = "not_served"  # the planner decided it cannot be placed (and said why)
    LOADING = "loading"        # placed; no replica ready yet
    SERVING = "serving"        # at least one replica answers requests


@dataclass(frozen=True)
class HostedModel:
    """One model as a worker reports it."""

    model_id: ModelId
    state: LoadState
    error: str = ""
    engine_restarts: int = 0
    phase: str = ""
    progress: float = 0.0  # 0..1 through the phase
    draining: bool = False  # retiring: finishing its streams, taking no new ones
    running: int = 0        # sequences in its slots now
    queued: int = 0         # requests waiting for a slot now
    slots: int = 0          # 0: not reported


@dataclass(frozen=True)
class NodeStatus:
    worker_id: WorkerId
    address: str
    backend: str
    memory_budget_bytes: int
    threads: int
    rtt_ms: Mapping[WorkerId, float] = field(default_factory=dict)  # peer -> round trip
    models: tuple[HostedModel, ...] = ()


@dataclass(frozen=True)
class StageStatus:
    """One worker's share of a replica: layers [layer_start, layer_end)."""

    worker_id: WorkerId
    layer_start: int
    layer_end: int
    state: LoadState | None  # None: the worker is not in the mesh
    error: str = ""
    phase: str = ""
    progress: float = 0.0


@dataclass(frozen=True)
class ReplicaStatus:
    stages: tuple[StageStatus, ...]  # stages[0] is the head
    # Round trip from the head to each later stage; None where not measured yet.
    link_rtt_ms: Mapping[WorkerId, float | None] = field(default_factory=dict)
    retiring: bool = False  # takes no new requests; unloaded once its streams end

    @property
    def worker_id(self) -> WorkerId:
        return self.stages[0].worker_id

    @property
    def state(self) -> LoadState | None:
        return self.stages[0].state

    @property
    def split(self) -> bool:
        return len(self.stages) > 1


@dataclass(frozen=True)
class ModelStatus:
    model_id: ModelId
    source: str
    n_layers: int
    context_length: int
    weights_bytes: int
    required_bytes: int | None  # None until the planner has looked at the model
    state: ServingState
    unplaced_reason: str = ""   # why the planner could not place it (NOT_SERVED)
    replicas: tuple[ReplicaStatus, ...] = ()
    demand: ModelDemand | None = None  # as the gateways measured it (None: not known)
    experts: ExpertStatus | None = None  # served by expert shards: which hold which experts

    @property
    def ready_replicas(self) -> int:
        return sum(r.state is LoadState.READY and not r.retiring for r in self.replicas)

    @property
    def decided(self) -> bool:
        """Serving somewhere, or the planner said plainly why it cannot be."""
        return self.state in (ServingState.SERVING, ServingState.NOT_SERVED)

    @property
    def status_text(self) -> str:
        if self.state is ServingState.WAITING:
            return "waiting for the planner"
        if self.state is ServingState.NOT_SERVED:
            return f"not served: {self.unplaced_reason}"
        return str(self.state.value)  # "loading", "serving"


@dataclass(frozen=True)
class MeshStatus:
    nodes: tuple[NodeStatus, ...] = ()
    models: tuple[ModelStatus, ...] = ()
    suspects: tuple[SuspectStatus, ...] = ()  # workers reported unreachable, by worker id

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [_node_json(n) for n in self.nodes],
                "models": [_model_json(m) for m in self.models],
                "suspects": suspects_json(self.suspects)}

    @staticmethod
    def from_json(data: object) -> MeshStatus:
        """The status in a JSON document; a malformed one raises InvalidRecord naming the
        field."""
        doc = Fields(data, "")
        return MeshStatus(tuple(_node_from(f) for f in doc.objects("nodes")),
                          tuple(_model_from(f) for f in doc.objects("models")),
                          suspects_from_json(doc))


def serving_state(placement: Placement | None, replicas: tuple[ReplicaStatus, ...]
                  ) -> ServingState:
    if placement is None:
        return ServingState.WAITING
    if placement.unplaced_reason:
        return ServingState.NOT_SERVED
    if any(r.state is LoadState.READY for r in replicas):
        return ServingState.SERVING
    return ServingState.LOADING


def mesh_status(snapshot: MeshSnapshot,
                demand: Mapping[ModelId, ModelDemand] | None = None) -> MeshStatus:
    """The status of the mesh in `snapshot` (pure), with each model's `demand` (merged
    over the gateways) where given."""
    nodes = tuple(
        NodeStatus(w.worker_id, w.address, w.backend, w.memory_budget_bytes, w.threads,
                   {WorkerId(k): v for k, v in sorted(w.rtt_ms.items())},
                   tuple(HostedModel(m.model_id, m.state, m.error, m.engine_restarts, m.phase,
                                     round(m.progress, 3), m.draining, m.running, m.queued,
                                     m.slots) for m in w.models))
        for w in sorted(snapshot.workers.values(), key=lambda w: w.worker_id))
    demand = demand or {}
    models = tuple(_model(snapshot, spec, snapshot.placements.get(model_id),
                          demand.get(model_id))
                   for model_id, spec in sorted(snapshot.models.items()))
    return MeshStatus(nodes, models, suspect_status(snapshot))


def _model(snapshot: MeshSnapshot, spec: ModelSpec, placement: Placement | None,
           demand: ModelDemand | None = None) -> ModelStatus:
    replicas = tuple(_replica(snapshot, spec.model_id, r)
                     for r in (placement.replicas if placement else ()))
    return ModelStatus(
        model_id=spec.model_id, source=spec.source, n_layers=spec.n_layers,
        context_length=spec.context_length, weights_bytes=spec.weights_bytes,
        required_bytes=placement.required_bytes if placement else None,
        state=serving_state(placement, replicas),
        unplaced_reason=placement.unplaced_reason if placement else "", replicas=replicas,
        demand=demand, experts=expert_status(spec, placement, snapshot.workers))


def _replica(snapshot: MeshSnapshot, model_id: ModelId, replica: Replica) -> ReplicaStatus:
    stages = []
    for a in replica.stages:
        worker = snapshot.workers.get(a.worker_id)
        state = worker.model_state(model_id) if worker else None
        stages.append(StageStatus(a.worker_id, a.layer_start, a.layer_end,
                                  state.state if state else None,
                                  state.error if state else "", state.phase if state else "",
                                  round(state.progress, 3) if state else 0.0))
    head = snapshot.workers.get(replica.head.worker_id)
    links = {s.worker_id: head.rtt_ms.get(s.worker_id) if head else None
             for s in replica.stages[1:]}
    return ReplicaStatus(tuple(stages), links, replica.retiring)


# --- JSON ------------------------------------------------------------------------------


def _node_json(n: NodeStatus) -> dict[str, Any]:
    return {"worker_id": n.worker_id, "address": n.address, "backend": n.backend,
            "memory_budget_bytes": n.memory_budget_bytes, "threads": n.threads,
            "rtt_ms": dict(n.rtt_ms),
            "models": {m.model_id: {"state": m.state.value, "error": m.error,
                                    "engine_restarts": m.engine_restarts, "phase": m.phase,
                                    "progress": m.progress, "draining": m.draining,
                                    "running": m.running, "queued": m.queued,
                                    "slots": m.slots} for m in n.models}}


def _state_json(state: LoadState | None) -> str:
    return state.value if state else ABSENT


def _replica_json(r: ReplicaStatus) -> dict[str, Any]:
    stages = [{"worker_id": s.worker_id, "layers": [s.layer_start, s.layer_end],
               "state": _state_json(s.state), "error": s.error, "phase": s.phase,
               "progress": s.progress} for s in r.stages]
    return {"worker_id": r.worker_id, "state": _state_json(r.state), "split": r.split,
            "retiring": r.retiring, "stages": stages, "link_rtt_ms": dict(r.link_rtt_ms)}


def _model_json(m: ModelStatus) -> dict[str, Any]:
    return {"model_id": m.model_id, "source": m.source, "n_layers": m.n_layers,
            "context_length": m.context_length, "weights_bytes": m.weights_bytes,
            "required_bytes": m.required_bytes,
            "replicas": [_replica_json(r) for r in m.replicas],
            "ready_replicas": m.ready_replicas, "status": m.status_text,
            "state": m.state.value, "unplaced_reason": m.unplaced_reason,
            **({"demand": _demand_json(m.demand)} if m.demand else {}),  # absent: unknown
            **({"experts": expert_status_json(m.experts)} if m.experts else {})}


DEMAND_FIGURES = ("window_s", "requests_per_s", "refused_per_s", "mean_service_s",
                  "mean_queue_wait_s", "generated_tokens_per_s", "recent_requests_per_s",
                  "recent_s")


def _demand_json(d: ModelDemand) -> dict[str, Any]:
    """Figures rounded for readers; idle_s null for a model never requested (JSON has no
    infinity)."""
    return {**{name: round(getattr(d, name), 4) for name in DEMAND_FIGURES},
            "idle_s": round(d.idle_s, 1) if math.isfinite(d.idle_s) else None,
            "waiting_requests": d.waiting_requests}


# --- parsing ---------------------------------------------------------------------------


def _hosted_from(f: Fields, model_id: str) -> HostedModel:
    return HostedModel(ModelId(model_id), f.choice("state", LoadState), f.text("error"),
                       f.integer("engine_restarts"), f.text("phase"), f.number("progress"),
                       f.flag("draining"), f.count("running"), f.count("queued"),
                       f.count("slots"))


def _node_from(f: Fields) -> NodeStatus:
    rtt, models = f.mapping("rtt_ms"), f.mapping("models")
    return NodeStatus(
        WorkerId(f.text("worker_id")), f.text("address"), f.text("backend"),
        f.integer("memory_budget_bytes"), f.integer("threads"),
        {WorkerId(peer): rtt.number(peer) for peer in rtt.names()},
        tuple(_hosted_from(models.mapping(m), m) for m in models.names()))


def _layers(f: Fields) -> tuple[int, int]:
    value = f.get("layers")
    if (not isinstance(value, list) or len(value) != 2
            or any(type(v) is not int for v in value) or not 0 <= value[0] <= value[1]):
        f.fail("layers", f"expected [start, end] with 0 <= start <= end, got {value!r:.40}")
    return value[0], value[1]


def _stage_from(f: Fields) -> StageStatus:
    state = None if f.get("state") == ABSENT else f.choice("state", LoadState)
    return StageStatus(WorkerId(f.text("worker_id")), *_layers(f), state, f.text("error"),
                       f.text("phase"), f.number("progress"))


def _replica_from(f: Fields) -> ReplicaStatus:
    stages = tuple(_stage_from(s) for s in f.objects("stages"))
    if not stages:
        f.fail("stages", "a replica has at least one stage")
    links = f.mapping("link_rtt_ms")
    return ReplicaStatus(stages, {
        WorkerId(w): None if links.get(w) is None else links.number(w) for w in links.names()},
        f.flag("retiring"))


def _demand_from(f: Fields, model_id: ModelId) -> ModelDemand | None:
    """A model's demand; None where the document has none (a gateway from before it)."""
    if "demand" not in f.names() or f.get("demand") is None:
        return None
    d = f.mapping("demand")
    idle = math.inf if d.get("idle_s") is None else d.number("idle_s")
    return ModelDemand(model_id, idle_s=idle, waiting_requests=d.integer("waiting_requests"),
                       **{name: d.number(name) for name in DEMAND_FIGURES})


def _model_from(f: Fields) -> ModelStatus:
    model_id = ModelId(f.text("model_id"))
    return ModelStatus(
        model_id=model_id, source=f.text("source"),
        n_layers=f.integer("n_layers"), context_length=f.integer("context_length"),
        weights_bytes=f.integer("weights_bytes"),
        required_bytes=f.optional_integer("required_bytes"),
        state=f.choice("state", ServingState), unplaced_reason=f.text("unplaced_reason"),
        replicas=tuple(_replica_from(r) for r in f.objects("replicas")),
        demand=_demand_from(f, model_id),
        experts=expert_status_from_json(f.get("experts") if "experts" in f.names() else None))
