"""The mesh status as plain data: served by the gateway, printed by `mesh-llm status`."""

from __future__ import annotations

from typing import Any

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import LoadState, ModelId, Replica


def mesh_status(snapshot: MeshSnapshot) -> dict[str, Any]:
    nodes = [
        {"worker_id": w.worker_id, "address": w.address, "backend": w.backend,
         "memory_budget_bytes": w.memory_budget_bytes, "threads": w.threads,
         "rtt_ms": dict(sorted(w.rtt_ms.items())),
         "models": {m.model_id: {"state": m.state.value, "error": m.error,
                                 "engine_restarts": m.engine_restarts, "phase": m.phase,
                                 "progress": round(m.progress, 3)} for m in w.models}}
        for w in sorted(snapshot.workers.values(), key=lambda w: w.worker_id)
    ]
    models = []
    for model_id, spec in sorted(snapshot.models.items()):
        placement = snapshot.placements.get(model_id)
        replicas = [_replica(snapshot, model_id, r)
                    for r in (placement.replicas if placement else ())]
        models.append({
            "model_id": model_id, "source": spec.source, "n_layers": spec.n_layers,
            "context_length": spec.context_length, "weights_bytes": spec.weights_bytes,
            "required_bytes": placement.required_bytes if placement else None,
            "replicas": replicas,
            "ready_replicas": sum(r["state"] == LoadState.READY.value for r in replicas),
            "status": _model_status(placement.unplaced_reason if placement else None, replicas),
        })
    return {"nodes": nodes, "models": models}


def _replica(snapshot: MeshSnapshot, model_id: ModelId, replica: Replica) -> dict[str, Any]:
    stages = []
    for a in replica.stages:
        worker = snapshot.workers.get(a.worker_id)
        state = worker.model_state(model_id) if worker else None
        stages.append({"worker_id": a.worker_id, "layers": [a.layer_start, a.layer_end],
                       "state": state.state.value if state else "absent",
                       "error": state.error if state else "",
                       "phase": state.phase if state else "",
                       "progress": round(state.progress, 3) if state else 0.0})
    head = replica.head.worker_id
    links = {}
    for stage in replica.stages[1:]:
        worker = snapshot.workers.get(head)
        rtt = worker.rtt_ms.get(stage.worker_id) if worker else None
        links[stage.worker_id] = rtt
    return {"worker_id": head, "state": stages[0]["state"], "split": replica.is_split,
            "stages": stages, "link_rtt_ms": links}


def _model_status(unplaced_reason: str | None, replicas: list[dict[str, Any]]) -> str:
    if unplaced_reason is None:
        return "waiting for the planner"
    if unplaced_reason:
        return f"not served: {unplaced_reason}"
    if any(r["state"] == LoadState.READY.value for r in replicas):
        return "serving"
    return "loading"
