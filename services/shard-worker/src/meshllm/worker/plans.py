"""What this worker must run for each model, derived from a mesh snapshot (pure)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import LoadState, ModelId, ModelSpec, Replica, WorkerId


class Role(enum.Enum):
    WHOLE = "whole"   # the whole model in one engine
    HEAD = "head"     # embeddings, output and the first layers; drives the stages over RPC
    STAGE = "stage"   # a range of later layers, served to the head by a ggml RPC server


@dataclass(frozen=True)
class StagePeer:
    worker_id: WorkerId
    address: str        # gRPC address, for the tunnel
    rpc_endpoint: str   # host:port for direct ggml RPC ("" : tunnel only)
    layer_start: int
    layer_end: int

    @property
    def n_layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class HostPlan:
    spec: ModelSpec
    role: Role
    layer_start: int
    layer_end: int
    peers: tuple[StagePeer, ...] = ()   # a head's stages, in layer order
    waiting_for: tuple[WorkerId, ...] = ()  # a head's stages that are not serving yet

    @property
    def ready_to_load(self) -> bool:
        return not self.waiting_for


def _peer(snapshot: MeshSnapshot, model_id: ModelId, worker_id: WorkerId, start: int,
          end: int) -> tuple[StagePeer | None, bool]:
    worker = snapshot.workers.get(worker_id)
    state = worker.model_state(model_id) if worker else None
    if worker is None or state is None:
        return None, False
    endpoint = f"{worker.rpc_host}:{state.rpc_port}" if worker.rpc_host and state.rpc_port \
        else ""
    ready = state.state is LoadState.READY
    return StagePeer(worker_id, worker.address, endpoint, start, end), ready


def _plan(snapshot: MeshSnapshot, spec: ModelSpec, replica: Replica, index: int) -> HostPlan:
    me = replica.stages[index]
    if not replica.is_split:
        return HostPlan(spec, Role.WHOLE, 0, spec.n_layers)
    if index > 0:
        return HostPlan(spec, Role.STAGE, me.layer_start, me.layer_end)
    peers, waiting = [], []
    for stage in replica.stages[1:]:
        peer, ready = _peer(snapshot, spec.model_id, stage.worker_id, stage.layer_start,
                            stage.layer_end)
        if peer is not None:
            peers.append(peer)
        if not ready:
            waiting.append(stage.worker_id)
    return HostPlan(spec, Role.HEAD, me.layer_start, me.layer_end, tuple(peers),
                    tuple(waiting))


def assigned_plans(snapshot: MeshSnapshot, worker_id: WorkerId) -> dict[ModelId, HostPlan]:
    """Each model placed on `worker_id` (whole, as a head, or as a stage) and what it needs."""
    plans = {}
    for model_id, placement in snapshot.placements.items():
        spec = snapshot.models.get(model_id)
        if spec is None:
            continue
        for replica in placement.replicas:
            for i, stage in enumerate(replica.stages):
                if stage.worker_id == worker_id:
                    plans[model_id] = _plan(snapshot, spec, replica, i)
    return plans
