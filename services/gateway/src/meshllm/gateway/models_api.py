"""`/api/models`: declare a model at run time, list the declared ones with their state,
remove one. The gateway writes declarations to etcd; the planner describes and places them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshllm.common import convert, models, store
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.store import KeyValueStore
from meshllm.common.types import ModelDeclaration, ModelId
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.errors import invalid
from meshllm.gateway.failures import ModelAlreadyDeclared, UnknownModel
from meshllm.gateway.openai_api import parse_json
from meshllm.gateway.routing import ready_replicas, serving_state
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

MAX_SOURCE_CHARS = 4096
MAX_REPLICAS = 10_000
PRIORITY_RANGE = (-1_000_000, 1_000_000)
FIELDS = ("model", "min_replicas", "max_replicas", "priority")
SNAPSHOT_WAIT_S = 5.0  # for the gateway's own write to come back through its etcd watch


def _count(data: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key} must be an integer, got {value!r}", key)
    if not low <= value <= high:
        raise invalid(f"{key} must be between {low} and {high}, got {value}", key)
    return value


def parse_declaration(data: Mapping[str, Any]) -> ModelDeclaration:
    """A POST /api/models body: {"model": NAME_OR_GGUF_PATH, "min_replicas": 0,
    "max_replicas": 0 (as many as fit), "priority": 0}."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}: expected {', '.join(FIELDS)}", unknown[0])
    source = data.get("model")
    if not isinstance(source, str) or not source.strip():
        raise invalid("model must be a model name or the path of a .gguf file", "model")
    if len(source) > MAX_SOURCE_CHARS:
        raise invalid(f"model is longer than {MAX_SOURCE_CHARS} characters", "model")
    model_id = models.model_id_for(source.strip())
    if not convert.MODEL_ID.fullmatch(model_id):
        raise invalid(f"model {source!r} gives no usable model id", "model")
    low, high = _count(data, "min_replicas", 0, MAX_REPLICAS), _count(
        data, "max_replicas", 0, MAX_REPLICAS)
    if high and low > high:
        raise invalid(f"min_replicas ({low}) exceeds max_replicas ({high})", "min_replicas")
    return ModelDeclaration(model_id, source.strip(), low, high,
                            _count(data, "priority", *PRIORITY_RANGE))


def declaration_json(snapshot: MeshSnapshot, declaration: ModelDeclaration) -> dict[str, Any]:
    """A declaration with where it stands: waiting, loading, serving or not_served (and
    why, unless it serves)."""
    state, reason = serving_state(snapshot, declaration.model_id)
    placement = snapshot.placements.get(declaration.model_id)
    return {"id": declaration.model_id, "object": "model_declaration",
            "model": declaration.source, "min_replicas": declaration.min_replicas,
            "max_replicas": declaration.max_replicas, "priority": declaration.priority,
            "at_start": declaration.at_start,
            "state": state.value, "reason": reason,
            "replicas": len(placement.replicas) if placement else 0,
            "ready_replicas": len(ready_replicas(snapshot, declaration.model_id))}


class ModelsApi:
    def __init__(self, kv: KeyValueStore, backend: MeshBackend,
                 snapshot_wait_s: float = SNAPSHOT_WAIT_S) -> None:
        self._kv = kv
        self._backend = backend
        self._snapshot_wait_s = snapshot_wait_s

    async def list(self, request: Request) -> Response:
        snapshot = self._backend.snapshot
        data = [declaration_json(snapshot, d) for _, d in sorted(snapshot.declarations.items())]
        return JSONResponse({"object": "list", "data": data})

    async def add(self, request: Request) -> Response:
        declaration = parse_declaration(parse_json(await request.body()))
        key = store.DECLARATIONS + declaration.model_id
        if not await self._kv.create(key, convert.declaration_to_pb(declaration)
                                     .SerializeToString()):
            raise ModelAlreadyDeclared(
                f"model {declaration.model_id} is declared already: DELETE "
                f"/api/models/{declaration.model_id} first to declare it again")
        # Answered once this gateway's snapshot has it, so that a request for the model
        # sent next finds it declared (and waits for it to load) instead of a 404.
        await self._backend.wait_until(
            lambda s: declaration.model_id in s.declarations, self._snapshot_wait_s)
        return JSONResponse(declaration_json(self._backend.snapshot, declaration),
                            status_code=201)

    async def remove(self, request: Request) -> Response:
        model_id = ModelId(request.path_params["model_id"])
        key = store.DECLARATIONS + model_id
        # etcd, not the snapshot: a model declared a moment ago may not be in it yet
        if key not in await self._kv.get_prefix(key):
            raise UnknownModel(model_id, sorted(self._backend.snapshot.declarations))
        await self._kv.delete(key)
        await self._backend.wait_until(lambda s: model_id not in s.declarations,
                                       self._snapshot_wait_s)
        return JSONResponse({"id": model_id, "object": "model_declaration", "deleted": True})


def models_routes(api: ModelsApi) -> list[BaseRoute]:
    return [Route("/api/models", api.list, methods=["GET"]),
            Route("/api/models", api.add, methods=["POST"]),
            Route("/api/models/{model_id}", api.remove, methods=["DELETE"])]
