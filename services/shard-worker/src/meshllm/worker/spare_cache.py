"""Workers keep the stages they may be asked to take over warm.

When a stage of a split dies, the planner moves its layers to another worker (a spare, or
the old head when it moves the head to the spare). That worker's stage server finds the
weights in its cache only if it has them there; otherwise the head sends them over the
link, which for a large model is most of the time the stream waits. So every worker that
can read a split model's file writes the cache entries of the split's stage layers ahead of
time, in the background (`stage_cache`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshllm.common.errors import ModelSourceError
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import LoadState, ModelId, ModelSpec, Replica
from meshllm.worker.hosts import StagePrimer
from meshllm.worker.stage import PrimingFailed, job_to_prime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpareLayers:
    spec: ModelSpec
    layer_start: int
    layer_end: int  # excluded


def stage_layers(snapshot: MeshSnapshot) -> tuple[SpareLayers, ...]:
    """For each model split by layers: the layers after the heads of its live replicas.
    A re-plan around a dead stage may give them to any worker, the old head included (the
    planner may move the head to a spare and make the old head a stage); a new head reads
    its own copy of the file and needs no cache."""
    wanted = []
    for model_id, placement in snapshot.placements.items():
        spec = snapshot.models.get(model_id)
        stages = [s for r in placement.replicas
                  if not r.retiring and not r.experts and _serving(snapshot, model_id, r)
                  for s in r.stages[1:]]
        if spec is not None and stages:
            wanted.append(SpareLayers(spec, min(s.layer_start for s in stages),
                                      max(s.layer_end for s in stages)))
    return tuple(wanted)


def _serving(snapshot: MeshSnapshot, model_id: ModelId, replica: Replica) -> bool:
    """Whether the split's head is ready: priming waits for the split's own load, which it
    would slow down (it reads and writes the same bytes)."""
    head = snapshot.workers.get(replica.head.worker_id)
    state = None if head is None else head.model_state(model_id)
    return state is not None and state.state is LoadState.READY


class SparePrimer:
    """Primes this worker's stage cache for every split in the mesh whose model file it
    can read, once per model and layer range, one at a time."""

    def __init__(self, cache_dir: Path, child_env: Mapping[str, str],
                 primer: StagePrimer) -> None:
        self._cache_dir = cache_dir
        self._child_env = child_env
        self._primer = primer
        self._seen: set[tuple[str, int, int]] = set()
        self._queue: asyncio.Queue[SpareLayers] = asyncio.Queue()

    def follow(self, snapshot: MeshSnapshot) -> None:
        for layers in stage_layers(snapshot):
            key = (layers.spec.source, layers.layer_start, layers.layer_end)
            if key not in self._seen:
                self._seen.add(key)
                self._queue.put_nowait(layers)

    async def run(self) -> None:
        while True:
            await self._prime(await self._queue.get())

    async def _prime(self, layers: SpareLayers) -> None:
        model_id = layers.spec.model_id
        try:
            job = await job_to_prime(layers.spec.source, layers.layer_start,
                                     layers.layer_end, self._cache_dir, self._child_env)
        except ModelSourceError as exc:
            log.info("%s: no local model file to keep a spare stage warm (%s)", model_id, exc)
            return
        if job is None:
            return
        try:
            primed = await self._primer(job, lambda fraction: None)
        except PrimingFailed as exc:
            log.warning("%s: priming the cache for a spare stage failed: %s", model_id, exc)
            return
        log.info("%s: cache primed for a spare stage of layers %d-%d: %d tensors, %d written "
                 "(%.1f MB) in %.2fs", model_id, job.layer_start, job.layer_end - 1,
                 primed.entries, primed.written, primed.bytes_written / 1e6, primed.seconds)
