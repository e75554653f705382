"""Telling the planner about a split that failed a stream, so that it re-plans at once.

When a split's head fails a stream the gateway cannot tell which of its workers died (the
head's engine fails with its stage), and the dead one's lease keeps it in the mesh for up
to its TTL. So the gateway reports every worker of the split under /meshllm/suspects/; the
planner checks each one's health and plans around those that do not answer
(planner/suspects.py). A report lives `ttl_s` on a lease of its own: long enough for the
dead worker's lease to run out, short enough that a stale one fades by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from meshllm.common import store
from meshllm.common.suspects import SuspectReport, suspect_to_pb
from meshllm.common.types import Replica, WorkerId, WorkerInfo

log = logging.getLogger(__name__)

REPORT_TTL_S = 30  # etcd leases are whole seconds
# The same worker instance in the same split is not reported again sooner: every stream of
# a failed split fails within moments, and one report covers them. A split re-planned (other
# stages) that fails is reported at once: a second stage may have died right after the first.
REPEAT_AFTER_S = 2.0


def to_report(replica: Replica, workers: Mapping[WorkerId, WorkerInfo]
              ) -> tuple[WorkerInfo, ...]:
    """The workers of a failed split that the planner should check: all of its stages
    (any of them may be the dead one). Whole replicas are not reported: another replica
    carries their streams on at once and the lease retires them soon enough."""
    if not replica.is_split:
        return ()
    return tuple(workers[s.worker_id] for s in replica.stages if s.worker_id in workers)


class SuspectReporter:
    def __init__(self, kv: store.KeyValueStore, reporter: str,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._reporter = reporter
        self._clock = clock
        self._wall = wall_clock
        # (worker, instance, the split's workers) -> when
        self._reported: dict[tuple[WorkerId, float, tuple[WorkerId, ...]], float] = {}
        self._writes: set[asyncio.Task[None]] = set()

    def report(self, workers: tuple[WorkerInfo, ...], reason: str) -> None:
        """Reports `workers` in the background: the failed stream's recovery never waits
        on etcd."""
        now = self._clock()
        split = tuple(w.worker_id for w in workers)
        fresh = tuple(w for w in workers if now - self._reported.get(
            (w.worker_id, w.started_at_unix_s, split), -REPEAT_AFTER_S) >= REPEAT_AFTER_S)
        if not fresh:
            return
        for worker in fresh:
            self._reported[(worker.worker_id, worker.started_at_unix_s, split)] = now
        task = asyncio.ensure_future(self._write(fresh, reason[:500]))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, workers: tuple[WorkerInfo, ...], reason: str) -> None:
        try:
            lease = await self._kv.grant_lease(REPORT_TTL_S)
            for w in workers:
                record = SuspectReport(w.worker_id, w.started_at_unix_s, self._reporter,
                                       reason, self._wall())
                await self._kv.put(store.SUSPECTS + w.worker_id,
                                   suspect_to_pb(record).SerializeToString(), lease)
        except Exception as exc:  # aetcd raises several types; all mean "not now"
            # Not retried: the dead worker's lease runs out in any case, only later.
            log.warning("could not report %s to the planner (%s): the split is re-planned "
                        "when their leases run out", [w.worker_id for w in workers], exc)
            return
        log.info("reported %s to the planner: %s", [w.worker_id for w in workers], reason)

    async def drain(self) -> None:
        """Waits for the reports under way."""
        await asyncio.gather(*self._writes)

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
