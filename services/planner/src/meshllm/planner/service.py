"""The planner process: watches membership, re-plans, publishes placements."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from meshllm.common import convert, store
from meshllm.common.errors import InvalidRecord
from meshllm.common.suspects import SuspectReport, suspect_to_pb
from meshllm.common.types import ModelDeclaration, ModelId, ModelSpec, Placement, WorkerId
from meshllm.planner.assign import RoundInputs, RoundPolicy, RoundResult, next_placements
from meshllm.planner.declared import ModelCatalog, PlanInputs, parse_inputs, specs_of
from meshllm.planner.demand import Moves, ReplicaPhase
from meshllm.planner.suspects import SuspectProbes
from meshllm.v1 import planner_pb2, planner_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


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


@dataclass(frozen=True)
class PlannerSettings:
    declared_at_start: tuple[ModelDeclaration, ...]  # the --models
    policy: RoundPolicy
    debounce_s: float   # wait this long for membership to settle before a round
    interval_s: float   # a round at least this often (ages and cool-downs run out)


class RoundMemory:
    """What a round needs from the rounds before it: when each replica entered its phase,
    and when each model last grew and shrank (the hysteresis clocks). Kept in memory: a
    restarted planner starts every clock again, which only delays moves."""

    def __init__(self) -> None:
        self.since_s: dict[tuple[ModelId, WorkerId], tuple[ReplicaPhase, float]] = {}
        self.last_grew_s: dict[ModelId, float] = {}
        self.last_shrank_s: dict[ModelId, float] = {}

    def remember(self, result: RoundResult) -> None:
        now = result.current.now_s
        self.since_s = {(h.model_id, h.worker_id): (h.phase, h.since_s)
                        for h in result.current.replicas}
        for add in result.moves.adds:
            self.last_grew_s[add.model_id] = now
        for retire in result.moves.retires:
            self.last_shrank_s[retire.model_id] = now


class Planner:
    """Plans a round whenever the mesh changes (workers, their models' states, the
    declarations, the demand) and at least every `interval_s`."""

    def __init__(self, kv: store.KeyValueStore, settings: PlannerSettings,
                 catalog: ModelCatalog, board: PlacementBoard, suspects: SuspectProbes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._kv = kv
        self._suspects = suspects
        self._settings = settings
        self._catalog = catalog
        self._board = board
        self._clock = clock
        self._memory = RoundMemory()
        self._left_out_held: dict[str, bytes] | None = None  # None: not read from etcd yet

    async def declare_at_start(self) -> None:
        """Declare the --models unless they are already, and undeclare those an earlier
        start declared that are no longer among them. A restarted planner keeps the
        declarations made at run time, and their settings, as they are."""
        at_start = self._settings.declared_at_start
        wanted = {store.DECLARATIONS + d.model_id for d in at_start}
        for key, value in (await self._kv.get_prefix(store.DECLARATIONS)).items():
            with contextlib.suppress(InvalidRecord):  # parse_inputs says why, once
                if key not in wanted and convert.parse_declaration(value).at_start:
                    await self._kv.delete(key)
                    log.info("undeclared %s: no longer among --models",
                             key.removeprefix(store.DECLARATIONS))
        for declaration in at_start:
            if await self._kv.create(store.DECLARATIONS + declaration.model_id,
                                     convert.declaration_to_pb(declaration).SerializeToString()):
                log.info("declared %s (%s)", declaration.model_id, declaration.source)

    async def run(self) -> None:
        await self.declare_at_start()
        # The --models are read now, while the workers register, so that the first plan
        # is made from a snapshot taken after reading them (it may take seconds).
        await self._catalog.describe(self._settings.declared_at_start)
        published = await self._read_published()
        settled: tuple[object, ...] | None = None
        async for raw in ticking(store.mirror_prefix(self._kv, store.ROOT),
                                 self._settings.interval_s):
            inputs = parse_inputs(raw)
            # Reports of unreachable workers are not membership: each is checked on its
            # own, so the round that re-plans around a dead stage starts without a pause.
            membership = ({w.worker_id: w.memory_budget_bytes for w in inputs.workers},
                          inputs.declarations)
            if membership != settled:
                settled = membership
                await asyncio.sleep(self._settings.debounce_s)
            published = await self._round(inputs, published)

    async def _round(self, inputs: PlanInputs, published: dict[ModelId, Placement]
                     ) -> dict[ModelId, Placement]:
        described = await self._catalog.describe(inputs.declarations)
        # Left out after the debounce's membership check: a dead stage is planned around
        # at once, not after the pause that lets a burst of registrations settle.
        workers = await self._suspects.reachable(inputs.workers, inputs.suspects)
        result = next_placements(RoundInputs(
            specs={s.model_id: s for s in specs_of(described)},
            declarations={d.model_id: d for d in inputs.declarations},
            workers={w.worker_id: w for w in workers}, published=published,
            demand=inputs.demand, now_s=self._clock(), since_s=self._memory.since_s,
            last_grew_s=self._memory.last_grew_s,
            last_shrank_s=self._memory.last_shrank_s, rankings=inputs.rankings),
            self._settings.policy)
        self._memory.remember(result)
        # The specs as planned (slots sized to the workers): workers run what was budgeted.
        await self._publish_models(list(result.specs.values()), result.slot_notes)
        log_moves(result.moves)
        placements = result.placements
        for model_id, found in described.items():
            if isinstance(found, str):  # could not be read: says why to whoever asks
                placements[model_id] = Placement(model_id, (), 0, found)
        if placements != published:
            await self._write(placements, published)
            await self._board.update(placements)
        # After the placements: telling the status never delays the plan around a dead stage.
        await self._publish_left_out(self._suspects.verdicts())
        return placements

    async def _publish_left_out(self, verdicts: Sequence[SuspectReport]) -> None:
        """The planner's reports on the workers it leaves out, under LEFT_OUT for the
        status. Written only when they change: every write wakes each watcher of the mesh,
        this planner too. Those an earlier planner left are cleared on the first call."""
        wanted = {store.LEFT_OUT + v.worker_id: suspect_to_pb(v).SerializeToString()
                  for v in verdicts}
        if self._left_out_held is None:
            self._left_out_held = await self._kv.get_prefix(store.LEFT_OUT)
        if wanted != self._left_out_held:
            await store.write_changed(self._kv, self._left_out_held, wanted)
            self._left_out_held = wanted

    async def _publish_models(self, specs: Sequence[ModelSpec],
                              notes: Mapping[ModelId, str]) -> None:
        wanted = {store.MODELS + m.model_id: convert.model_spec_to_pb(m).SerializeToString()
                  for m in specs}
        held = await self._kv.get_prefix(store.MODELS)
        for key in await store.write_changed(self._kv, held, wanted):
            model_id = ModelId(key.removeprefix(store.MODELS))
            if model_id in notes:
                log.info("model %s: %s", model_id, notes[model_id])

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
            if placement.expert_deal is not None:
                log.info("model %s served by %s", model_id, placement.expert_deal.why)


async def ticking(source: AsyncIterator[T], interval_s: float) -> AsyncIterator[T]:
    """`source`'s items, and its last item again whenever `interval_s` passes without a
    new one (the next item is awaited in a task, so a tick never cancels the source)."""
    iterator = aiter(source)
    last = await anext(iterator)
    pending: asyncio.Task[T] = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            yield last
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if done:
                last = pending.result()
                pending = asyncio.ensure_future(anext(iterator))
    finally:
        pending.cancel()


def log_moves(moves: Moves) -> None:
    for add in moves.adds:
        log.info("rebalance: add %s on %s: %s", add.model_id, add.worker_id, add.reason)
    for retire in moves.retires:
        log.info("rebalance: retire %s on %s: %s", retire.model_id, retire.worker_id,
                 retire.reason)
    for blocked in moves.blocked:
        log.debug("rebalance: %s: %s", blocked.model_id, blocked.reason)
