"""Which replicas of a model can take a call now: pure functions of the mesh snapshot,
shared by the gateway (routing) and the blackboard (embedding posts)."""

from __future__ import annotations

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import LoadState, ModelId, WorkerInfo


def ready_replicas(snapshot: MeshSnapshot, model_id: ModelId,
                   whole_only: bool = False) -> list[WorkerInfo]:
    """Heads of the model's replicas that report it loaded (a split replica's head is
    ready only once its engine runs with every stage) and take new requests (not retiring,
    not draining); with `whole_only`, of the replicas held whole by one worker only."""
    placement = snapshot.placements.get(model_id)
    if placement is None:
        return []
    replicas = []
    for replica in placement.replicas:
        if replica.retiring or (whole_only and replica.is_split):
            continue
        worker_id = replica.head.worker_id
        worker = snapshot.workers.get(worker_id)
        state = worker.model_state(model_id) if worker else None
        if (worker is not None and state is not None and state.state is LoadState.READY
                and not state.draining):
            replicas.append(worker)
    return replicas


def serves_embeddings(snapshot: MeshSnapshot, model_id: ModelId) -> bool:
    """Whether a model serves embeddings: every model held whole somewhere does (mean
    pooling on a context of its own); a model only split across workers does not. Before
    it is placed: unless it is to be split."""
    placement = snapshot.placements.get(model_id)
    if placement is None or not placement.replicas:
        spec = snapshot.models.get(model_id)
        return spec is not None and not spec.force_split
    return any(not r.is_split for r in placement.replicas)
