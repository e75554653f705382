"""Workers reported unreachable: probed, and planned around while they do not answer.

A worker's etcd lease outlives it by up to its TTL; a split whose stage died would wait
that long before the planner moved the stage. A gateway whose stream through a split
failed reports the split's workers (common/suspects.py). A report is a hint, never a
verdict: the planner checks each reported worker's gRPC health itself and leaves out of
its plans only those that do not answer, for as long as they do not and the report lives,
and says so in a report of its own on each (`verdicts`, published by service.py for the
status to show).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from meshllm.common.suspects import NO_ANSWER, PLANNER, SuspectReport, names_instance
from meshllm.common.types import WorkerId, WorkerInfo
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuspectPolicy:
    probe_timeout_s: float  # a health check unanswered this long counts as failed
    reprobe_s: float        # a worker still reported is checked again after this long


@dataclass(frozen=True)
class Probe:
    alive: bool
    at_s: float  # monotonic time of the check


Instance = tuple[WorkerId, float]  # a worker id and its start: a restart is a new instance


def instance(worker: WorkerInfo) -> Instance:
    return worker.worker_id, worker.started_at_unix_s


def suspected(reports: Mapping[WorkerId, SuspectReport], workers: Sequence[WorkerInfo]
              ) -> list[WorkerInfo]:
    """The workers a report names, as the instance it names (a report made before the
    worker restarted is about a process that is gone)."""
    return [w for w in workers if (r := reports.get(w.worker_id)) is not None
            and names_instance(r, w.started_at_unix_s)]


def due(workers: Sequence[WorkerInfo], probes: Mapping[Instance, Probe], now_s: float,
        policy: SuspectPolicy) -> list[WorkerInfo]:
    """The suspected workers to check now: never checked, or last checked `reprobe_s` ago."""
    return [w for w in workers if (p := probes.get(instance(w))) is None
            or now_s - p.at_s >= policy.reprobe_s]


def unreachable(workers: Sequence[WorkerInfo], probes: Mapping[Instance, Probe]
                ) -> frozenset[WorkerId]:
    """The suspected workers whose last check failed."""
    return frozenset(w.worker_id for w in workers
                     if (p := probes.get(instance(w))) is not None and not p.alive)


class SuspectMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.checks = Counter("meshllm_planner_suspect_checks",
                              "Health checks of workers reported unreachable, by result",
                              ["result"], registry=registry)
        self.left_out = Gauge("meshllm_planner_workers_left_out",
                              "Workers planned around now: reported and not answering",
                              registry=registry)


class SuspectProbes:
    """The planner's checks of reported workers, kept between rounds."""

    def __init__(self, check: Callable[[WorkerInfo], Awaitable[bool]], policy: SuspectPolicy,
                 metrics: SuspectMetrics, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._check = check
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._wall = wall_clock
        self._probes: dict[Instance, Probe] = {}
        self._left_out: frozenset[WorkerId] = frozenset()
        # Each instance left out -> when it first was (wall clock: the status shows it).
        self._since: dict[Instance, float] = {}

    async def reachable(self, workers: Sequence[WorkerInfo],
                        reports: Mapping[WorkerId, SuspectReport]) -> tuple[WorkerInfo, ...]:
        """`workers` less those reported that fail their health check."""
        named = suspected(reports, workers)
        to_check = due(named, self._probes, self._clock(), self._policy)
        answers = await asyncio.gather(*(self._check(w) for w in to_check))
        now = self._clock()
        for worker, alive in zip(to_check, answers, strict=True):
            self._probes[instance(worker)] = Probe(alive, now)
            self._metrics.checks.labels("answered" if alive else "no answer").inc()
        live = {instance(w) for w in named}
        self._probes = {k: p for k, p in self._probes.items() if k in live}
        left_out = unreachable(named, self._probes)
        self._log_changes(left_out, reports)
        wall = self._wall()
        self._since = {instance(w): self._since.get(instance(w), wall)
                       for w in named if w.worker_id in left_out}
        self._metrics.left_out.set(len(left_out))
        return tuple(w for w in workers if w.worker_id not in left_out)

    def verdicts(self) -> tuple[SuspectReport, ...]:
        """The planner's report on each worker it leaves out now, since its first failed
        check, by worker id."""
        return tuple(SuspectReport(worker_id, started, PLANNER, NO_ANSWER, since)
                     for (worker_id, started), since in sorted(self._since.items()))

    def _log_changes(self, left_out: frozenset[WorkerId],
                     reports: Mapping[WorkerId, SuspectReport]) -> None:
        for worker_id in sorted(left_out - self._left_out):
            report = reports[worker_id]
            log.warning("worker %s left out of the plans: reported by %s (%s) and it did "
                        "not answer a health check", worker_id, report.reporter,
                        report.reason)
        for worker_id in sorted(self._left_out - left_out):
            log.info("worker %s planned with again: it answers, or it is gone", worker_id)
        self._left_out = left_out

