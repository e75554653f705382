"""Reports of workers that another service could not reach, and their wire form.

A gateway whose stream through a split failed cannot tell which stage died: it reports
every worker of the split. The planner probes each one reported and plans around those
that do not answer, long before their leases would run out (planner/suspects.py). The
planner writes a report of its own on each worker it leaves out (under store.LEFT_OUT, in
the same form), so that the status can say which are planned around (status_suspects.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshllm.common.errors import InvalidRecord
from meshllm.common.records import decode_record
from meshllm.common.types import WorkerId
from meshllm.v1 import mesh_pb2


@dataclass(frozen=True)
class SuspectReport:
    worker_id: WorkerId
    started_at_unix_s: float  # the instance reported: a restarted worker is not suspected
    reporter: str
    reason: str
    reported_at_unix_s: float


PLANNER = "planner"  # the reporter of the planner's own reports: those it leaves out
NO_ANSWER = "no answer to the planner's health check"


def names_instance(report: SuspectReport, started_at_unix_s: float) -> bool:
    """Whether `report` is about the worker process that started at `started_at_unix_s`:
    one made before the worker restarted is about a process that is gone."""
    return abs(report.started_at_unix_s - started_at_unix_s) < 1e-3


def suspect_to_pb(report: SuspectReport) -> mesh_pb2.SuspectReport:
    return mesh_pb2.SuspectReport(
        worker_id=report.worker_id, started_at_unix_s=report.started_at_unix_s,
        reporter=report.reporter, reason=report.reason,
        reported_at_unix_s=report.reported_at_unix_s)


def parse_suspect(raw: bytes) -> SuspectReport:
    message = decode_record(mesh_pb2.SuspectReport(), raw)
    if not message.worker_id:
        raise InvalidRecord("suspect report without worker_id")
    if not message.reporter:
        raise InvalidRecord(f"suspect report on {message.worker_id} without reporter")
    for name in ("started_at_unix_s", "reported_at_unix_s"):
        if not math.isfinite(getattr(message, name)):
            raise InvalidRecord(f"suspect report on {message.worker_id}: {name} not finite")
    return SuspectReport(WorkerId(message.worker_id), message.started_at_unix_s,
                         message.reporter, message.reason[:500], message.reported_at_unix_s)
