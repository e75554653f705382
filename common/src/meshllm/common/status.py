"""The mesh status as plain data: served by the gateway, printed by `mesh-llm status`."""

from __future__ import annotations

from typing import Any

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import LoadState


def mesh_status(snapshot: MeshSnapshot) -> dict[str, Any]:
    nodes = [
        {"worker_id": w.worker_id, "address": w.address, "backend": w.backend,
         "memory_budget_bytes": w.memory_budget_bytes, "threads": w.threads,
         "models": {m.model_id: {"state": m.state.value, "error": m.error,
                                 "engine_restarts": m.engine_restarts} for m in w.models}}
        for w in sorted(snapshot.workers.values(), key=lambda w: w.worker_id)
    ]
    models = []
    for model_id, spec in sorted(snapshot.models.items()):
        placement = snapshot.placements.get(model_id)
        replicas = []
        for a in placement.replicas if placement else ():
            worker = snapshot.workers.get(a.worker_id)
            state = worker.model_state(model_id) if worker else None
            replicas.append({"worker_id": a.worker_id, "layers": [a.layer_start, a.layer_end],
                             "state": state.state.value if state else "absent"})
        models.append({
            "model_id": model_id, "source": spec.source, "n_layers": spec.n_layers,
            "context_length": spec.context_length, "weights_bytes": spec.weights_bytes,
            "required_bytes": placement.required_bytes if placement else None,
            "replicas": replicas,
            "ready_replicas": sum(r["state"] == LoadState.READY.value for r in replicas),
            "status": _model_status(placement.unplaced_reason if placement else None, replicas),
        })
    return {"nodes": nodes, "models": models}


def _model_status(unplaced_reason: str | None, replicas: list[dict[str, Any]]) -> str:
    if unplaced_reason is None:
        return "waiting for the planner"
    if unplaced_reason:
        return f"not served: {unplaced_reason}"
    if any(r["state"] == LoadState.READY.value for r in replicas):
        return "serving"
    return "loading"
