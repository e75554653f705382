"""What this worker must run for each model, derived from a mesh snapshot (pure)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.moe import ExpertSelection, shard_bytes
from meshllm.common.types import LoadState, ModelId, ModelSpec, Placement, Replica, WorkerId


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
    retiring: bool = False  # its replica is being retired: drain it, then unload it
    required_bytes: int = 0  # memory the model takes on a worker (Placement.required_bytes)
    experts: ExpertSelection = ()  # an expert shard: cut one with these experts and load it

    @property
    def ready_to_load(self) -> bool:
        return not self.waiting_for

    def differs_only_in_retiring(self, other: HostPlan) -> bool:
        """The same host, retired or brought back: drained or resumed, never restarted."""
        return self.retiring != other.retiring and replace(other, retiring=self.retiring) == self


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
        return HostPlan(spec, Role.WHOLE, 0, spec.n_layers, experts=replica.experts)
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


def _required_bytes(spec: ModelSpec, placement: Placement, replica: Replica) -> int:
    """What the replica takes here: the placement's figure, less the experts a shard lacks."""
    if not replica.experts or spec.moe is None:
        return placement.required_bytes
    lacking = spec.moe.total_bytes - shard_bytes(spec.moe, len(replica.experts[0]))
    return max(0, placement.required_bytes - lacking)


def _head_holds(snapshot: MeshSnapshot, model_id: ModelId, replica: Replica) -> bool:
    """Whether a split replica's head still lists the model (a whole one: always true, its
    only worker is the one asking and decides for itself)."""
    if not replica.is_split:
        return True
    head = snapshot.workers.get(replica.head.worker_id)
    return head is not None and head.model_state(model_id) is not None


def assigned_plans(snapshot: MeshSnapshot, worker_id: WorkerId) -> dict[ModelId, HostPlan]:
    """Each model placed on `worker_id` (whole, as a head, or as a stage) and what it needs."""
    plans: dict[ModelId, HostPlan] = {}
    for model_id, placement in snapshot.placements.items():
        spec = snapshot.models.get(model_id)
        if spec is None:
            continue
        for replica in placement.replicas:
            if replica.retiring and not _head_holds(snapshot, model_id, replica):
                continue  # its head has unloaded: nothing runs through its stages any more
            for i, stage in enumerate(replica.stages):
                # A live replica outranks a retiring one of the same model here.
                if stage.worker_id == worker_id and (
                        model_id not in plans or plans[model_id].retiring):
                    plans[model_id] = replace(
                        _plan(snapshot, spec, replica, i), retiring=replica.retiring,
                        required_bytes=_required_bytes(spec, placement, replica))
    return plans


@dataclass(frozen=True)
class Held:
    """A model this worker holds (loading, serving or draining) for the memory gate."""

    model_id: ModelId
    required_bytes: int
    draining: bool


def memory_wait(budget_bytes: int, held: Sequence[Held], required_bytes: int) -> str:
    """Why a new host must wait before it loads ("": it may load now).

    It waits while the budget less what the held hosts take is short of what it needs and
    a draining host will free memory. With nothing draining it loads anyway: the placement
    is the planner's word on what fits, and waiting would never end."""
    free = budget_bytes - sum(h.required_bytes for h in held)
    draining = [h.model_id for h in held if h.draining]
    if free >= required_bytes or not draining:
        return ""
    return f"waiting for memory: draining {', '.join(draining)}"


class DrainStep(enum.Enum):
    KEEP = "keep"          # streams run, or the grace has not passed: keep serving
    STOP = "stop"          # idle for the grace: unload
    CUT = "cut"            # the drain took too long: unload, cutting what still runs
                           # (a stage: whatever its head still runs)


def drain_step(role: Role, in_flight: int, idle_s: float, draining_s: float, grace_s: float,
               timeout_s: float) -> DrainStep:
    """What a draining host does now. A stage never stops by itself: its streams are its
    head's, which it cannot count; it stays until its plan goes (the head has unloaded, see
    assigned_plans) or the drain times out."""
    if draining_s >= timeout_s:
        return DrainStep.CUT if in_flight or role is Role.STAGE else DrainStep.STOP
    if role is not Role.STAGE and in_flight == 0 and idle_s >= grace_s:
        return DrainStep.STOP
    return DrainStep.KEEP
