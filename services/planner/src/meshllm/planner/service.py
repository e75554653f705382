"""The planner process: watches membership, re-plans, publishes placements."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
from meshllm.common import convert, store
from meshllm.common.errors import InvalidRecord
from meshllm.common.types import ModelDeclaration, ModelId, ModelSpec, Placement
from meshllm.planner.declared import ModelCatalog, parse_inputs, plan, specs_of
from meshllm.planner.place import PlacementPolicy
from meshllm.v1 import planner_pb2, planner_pb2_grpc

log = logging.getLogger(__name__)


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
    """Re-plans whenever the declared models, the set of workers or their budgets change."""

    def __init__(self, kv: store.KeyValueStore, declared_at_start: Sequence[ModelDeclaration],
                 catalog: ModelCatalog, policy: PlacementPolicy, board: PlacementBoard,
                 debounce_s: float) -> None:
        self._kv = kv
        self._at_start = declared_at_start
        self._catalog = catalog
        self._policy = policy
        self._board = board
        self._debounce_s = debounce_s

    async def declare_at_start(self) -> None:
        """Declare the --models unless they are already, and undeclare those an earlier
        start declared that are no longer among them. A restarted planner keeps the
        declarations made at run time, and their settings, as they are."""
        wanted = {store.DECLARATIONS + d.model_id for d in self._at_start}
        for key, value in (await self._kv.get_prefix(store.DECLARATIONS)).items():
            with contextlib.suppress(InvalidRecord):  # parse_inputs says why, once
                if key not in wanted and convert.parse_declaration(value).at_start:
                    await self._kv.delete(key)
                    log.info("undeclared %s: no longer among --models",
                             key.removeprefix(store.DECLARATIONS))
        for declaration in self._at_start:
            if await self._kv.create(store.DECLARATIONS + declaration.model_id,
                                     convert.declaration_to_pb(declaration).SerializeToString()):
                log.info("declared %s (%s)", declaration.model_id, declaration.source)

    async def run(self) -> None:
        await self.declare_at_start()
        # The --models are read now, while the workers register, so that the first plan
        # is made from a snapshot taken after reading them (it may take seconds).
        await self._catalog.describe(self._at_start)
        published = await self._read_published()
        last: tuple[object, ...] | None = None
        async for raw in store.mirror_prefix(self._kv, store.ROOT):
            inputs = parse_inputs(raw)
            budgets = {w.worker_id: w.memory_budget_bytes for w in inputs.workers}
            if (budgets, inputs.declarations) == last:
                continue  # load states or our own records changed: placement depends on
                          # budgets and declarations alone
            last = (budgets, inputs.declarations)
            await asyncio.sleep(self._debounce_s)
            described = await self._catalog.describe(inputs.declarations)
            await self._publish_models(specs_of(described))
            placements = plan(inputs.declarations, described, inputs.workers, published,
                              self._policy)
            await self._write(placements, published)
            published = placements
            await self._board.update(placements)

    async def _publish_models(self, specs: Sequence[ModelSpec]) -> None:
        wanted = {store.MODELS + m.model_id: convert.model_spec_to_pb(m).SerializeToString()
                  for m in specs}
        held = await self._kv.get_prefix(store.MODELS)
        for key in held.keys() - wanted.keys():
            await self._kv.delete(key)
        for key, value in wanted.items():
            if held.get(key) != value:  # an unchanged record is not written: no watch event
                await self._kv.put(key, value)
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
            log.info("placement %s removed: the model is no longer declared", model_id)
        for model_id, placement in placements.items():
            if published.get(model_id) == placement:
                continue
            await self._kv.put(store.PLACEMENTS + model_id,
                               convert.placement_to_pb(placement).SerializeToString())
            hosts = ", ".join(placement.worker_ids) or placement.unplaced_reason
            log.info("placement %s -> %s", model_id, hosts)
