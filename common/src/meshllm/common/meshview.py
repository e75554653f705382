"""The mesh as one validated snapshot of what etcd holds: workers, models, placements, the
models declared, the demand the gateways measured and the workers reported unreachable."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from meshllm.common import convert, store
from meshllm.common.demand import GatewayDemand, parse_demand
from meshllm.common.errors import InvalidRecord
from meshllm.common.suspects import SuspectReport, parse_suspect
from meshllm.common.types import (
    ModelDeclaration,
    ModelId,
    ModelSpec,
    Placement,
    WorkerId,
    WorkerInfo,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class MeshSnapshot:
    workers: Mapping[WorkerId, WorkerInfo] = field(default_factory=dict)
    models: Mapping[ModelId, ModelSpec] = field(default_factory=dict)
    placements: Mapping[ModelId, Placement] = field(default_factory=dict)
    declarations: Mapping[ModelId, ModelDeclaration] = field(default_factory=dict)
    demand: Mapping[str, GatewayDemand] = field(default_factory=dict)  # by gateway id
    # By worker id: the gateways' reports, and the planner's on those it plans around.
    suspects: Mapping[WorkerId, SuspectReport] = field(default_factory=dict)
    left_out: Mapping[WorkerId, SuspectReport] = field(default_factory=dict)


def _parse_all(raw: Mapping[str, bytes], prefix: str, parse: Callable[[bytes], T]) -> list[T]:
    parsed = []
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue
        try:
            parsed.append(parse(value))
        except InvalidRecord as exc:
            log.warning("ignoring invalid record %s: %s", key, exc)
    return parsed


def parse_snapshot(raw: Mapping[str, bytes]) -> MeshSnapshot:
    workers = _parse_all(raw, store.WORKERS, convert.parse_worker)
    models = _parse_all(raw, store.MODELS, convert.parse_model_spec)
    placements = _parse_all(raw, store.PLACEMENTS, convert.parse_placement)
    declarations = _parse_all(raw, store.DECLARATIONS, convert.parse_declaration)
    demand = _parse_all(raw, store.DEMAND, parse_demand)
    suspects = _parse_all(raw, store.SUSPECTS, parse_suspect)
    left_out = _parse_all(raw, store.LEFT_OUT, parse_suspect)
    return MeshSnapshot(
        workers={w.worker_id: w for w in workers},
        models={m.model_id: m for m in models},
        placements={p.model_id: p for p in placements},
        declarations={d.model_id: d for d in declarations},
        demand={d.gateway_id: d for d in demand},
        suspects={r.worker_id: r for r in suspects},
        left_out={r.worker_id: r for r in left_out},
    )


async def read_mesh(kv: store.KeyValueStore) -> MeshSnapshot:
    return parse_snapshot(await kv.get_prefix(store.ROOT))


async def follow_mesh(kv: store.KeyValueStore) -> AsyncIterator[MeshSnapshot]:
    """A new snapshot after every change under the mesh's etcd prefix."""
    async for raw in store.mirror_prefix(kv, store.ROOT):
        yield parse_snapshot(raw)
