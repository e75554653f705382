"""The planner process: watches membership, re-plans, publishes placements."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import grpc
from meshllm.common import convert, store
from meshllm.common.errors import InvalidRecord
from meshllm.common.types import ModelId, ModelSpec, Placement, WorkerId, WorkerInfo
from meshllm.planner.place import PlacementPolicy, place
from meshllm.v1 import planner_pb2, planner_pb2_grpc

log = logging.getLogger(__name__)


def parse_workers(raw: Mapping[str, bytes]) -> list[WorkerInfo]:
    """Valid worker records; an invalid one is logged and left out, never trusted."""
    workers = []
    for key, value in raw.items():
        try:
            workers.append(convert.parse_worker(value))
        except InvalidRecord as exc:
            log.warning("ignoring invalid worker record %s: %s", key, exc)
    return workers


class PlacementBoard:
    """The current placement set, with a revision that waiters can follow."""

    def __init__(self) -> None:
        self.placements: dict[ModelId, Placement] = {}
        self.revision = 0
        self._changed = asyncio.Condition()

    async def update(self, placements: dict[ModelId, Placement]) -> None:
        async with self._changed:
            self.placements = placements
            self.revision += 1
            self._changed.notify_all()

    async def follow(self) -> AsyncIterator[tuple[int, dict[ModelId, Placement]]]:
        seen = -1

        def changed() -> bool:
            return self.revision != seen

        while True:
            async with self._changed:
                await self._changed.wait_for(changed)
                seen = self.revision
                current = dict(self.placements)
            yield seen, current


def to_set(revision: int, placements: Mapping[ModelId, Placement]) -> planner_pb2.PlacementSet:
    return planner_pb2.PlacementSet(
        revision=revision,
        placements=[convert.placement_to_pb(p) for p in placements.values()],
    )


class PlannerServicer(planner_pb2_grpc.PlannerServicer):
    def __init__(self, board: PlacementBoard) -> None:
        self._board = board

    async def GetPlacements(
        self, request: planner_pb2.GetPlacementsRequest, context: grpc.aio.ServicerContext
    ) -> planner_pb2.PlacementSet:
        return to_set(self._board.revision, self._board.placements)

    async def WatchPlacements(
        self, request: planner_pb2.GetPlacementsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[planner_pb2.PlacementSet]:
        async for revision, placements in self._board.follow():
            yield to_set(revision, placements)


class Planner:
    """Re-plans whenever the set of workers or their budgets change."""

    def __init__(self, kv: store.KeyValueStore, models: list[ModelSpec],
                 policy: PlacementPolicy, board: PlacementBoard, debounce_s: float) -> None:
        self._kv = kv
        self._models = models
        self._policy = policy
        self._board = board
        self._debounce_s = debounce_s

    async def publish_models(self) -> None:
        wanted = {store.MODELS + m.model_id for m in self._models}
        for key in (await self._kv.get_prefix(store.MODELS)).keys() - wanted:
            await self._kv.delete(key)
        for model in self._models:
            await self._kv.put(store.MODELS + model.model_id,
                               convert.model_spec_to_pb(model).SerializeToString())

    async def run(self) -> None:
        await self.publish_models()
        published = await self._read_published()
        last_budgets: dict[WorkerId, int] | None = None
        async for raw in store.mirror_prefix(self._kv, store.WORKERS):
            workers = parse_workers(raw)
            budgets = {w.worker_id: w.memory_budget_bytes for w in workers}
            if budgets == last_budgets:
                continue  # only load states changed: placement depends on budgets alone
            last_budgets = budgets
            await asyncio.sleep(self._debounce_s)
            placements = place(self._models, workers, published, self._policy)
            await self._write(placements, published)
            published = placements
            await self._board.update(placements)

    async def _read_published(self) -> dict[ModelId, Placement]:
        found: dict[ModelId, Placement] = {}
        for key, value in (await self._kv.get_prefix(store.PLACEMENTS)).items():
            try:
                placement = convert.parse_placement(value)
            except InvalidRecord as exc:
                log.warning("dropping invalid placement %s: %s", key, exc)
                continue
            found[placement.model_id] = placement
        return found

    async def _write(self, placements: Mapping[ModelId, Placement],
                     published: Mapping[ModelId, Placement]) -> None:
        for model_id in published.keys() - placements.keys():
            await self._kv.delete(store.PLACEMENTS + model_id)
        for model_id, placement in placements.items():
            if published.get(model_id) == placement:
                continue
            await self._kv.put(store.PLACEMENTS + model_id,
                               convert.placement_to_pb(placement).SerializeToString())
            hosts = ", ".join(placement.worker_ids) or placement.unplaced_reason
            log.info("placement %s -> %s", model_id, hosts)
