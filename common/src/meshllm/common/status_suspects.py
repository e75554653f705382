"""The workers reported unreachable, as the status shows them: who reported each and why,
and whether the planner leaves it out of the plans (it did not answer the planner's health
check) or is still checking it, planning with it meanwhile. Part of the mesh status
(status.py), kept apart for size.

Built from the gateways' reports (store.SUSPECTS) and the planner's own on those it leaves
out (store.LEFT_OUT). A report counts only for the worker instance it names, and the
planner's only while a gateway's report on that instance lives: the planner plans around a
worker no longer than that, and its record may outlive a planner that stopped.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshllm.common.meshview import MeshSnapshot
from meshllm.common.status_fields import Fields
from meshllm.common.suspects import SuspectReport, names_instance
from meshllm.common.types import WorkerId, WorkerInfo


class SuspectState(enum.Enum):
    PROBING = "probing"    # planned with while the planner checks it (or since it answered)
    LEFT_OUT = "left_out"  # did not answer the planner's check: planned around


@dataclass(frozen=True)
class SuspectStatus:
    worker_id: WorkerId
    state: SuspectState
    since_unix_s: float  # left out: since the planner's first failed check; probing: the report
    reporter: str        # who could not reach it, e.g. "gateway-3f2a"
    reason: str          # what the reporter saw, in words

    @property
    def state_text(self) -> str:
        if self.state is SuspectState.LEFT_OUT:
            return "left out of placement (no answer to the planner's health check)"
        return "being probed (still placed)"


def _live(report: SuspectReport | None, worker: WorkerInfo) -> bool:
    return report is not None and names_instance(report, worker.started_at_unix_s)


def suspect_status(snapshot: MeshSnapshot) -> tuple[SuspectStatus, ...]:
    """The workers of `snapshot` that a live report names, by worker id (pure). A report on
    a worker gone from the mesh, or on an earlier instance of it, is left out: the planner
    ignores it too."""
    found = []
    for worker_id, report in sorted(snapshot.suspects.items()):
        worker = snapshot.workers.get(worker_id)
        if worker is None or not _live(report, worker):
            continue
        verdict = snapshot.left_out.get(worker_id)
        if verdict is not None and _live(verdict, worker):
            state, since = SuspectState.LEFT_OUT, verdict.reported_at_unix_s
        else:
            state, since = SuspectState.PROBING, report.reported_at_unix_s
        found.append(SuspectStatus(worker_id, state, since, report.reporter, report.reason))
    return tuple(found)


def suspects_json(suspects: Sequence[SuspectStatus]) -> list[dict[str, Any]]:
    return [{"worker_id": s.worker_id, "state": s.state.value,
             "left_out": s.state is SuspectState.LEFT_OUT,  # for readers; recomputed
             "since_unix_s": s.since_unix_s, "reporter": s.reporter, "reason": s.reason}
            for s in suspects]


def suspects_from_json(doc: Fields) -> tuple[SuspectStatus, ...]:
    """The status document's suspects; none where it has none (a gateway from before
    them)."""
    if "suspects" not in doc.names():
        return ()
    return tuple(SuspectStatus(WorkerId(f.text("worker_id")), f.choice("state", SuspectState),
                               f.number("since_unix_s"), f.text("reporter"), f.text("reason"))
                 for f in doc.objects("suspects"))
