"""Workers reported unreachable: the report's wire form, which instances a report names,
when they are checked, and that only a failed check leaves a worker out of the plans."""

from __future__ import annotations

import pytest
from meshllm.common import store
from meshllm.common.errors import InvalidRecord
from meshllm.common.suspects import SuspectReport, parse_suspect, suspect_to_pb
from meshllm.common.types import WorkerId, WorkerInfo
from meshllm.planner.declared import parse_inputs
from meshllm.planner.suspects import (
    Probe,
    SuspectMetrics,
    SuspectPolicy,
    SuspectProbes,
    due,
    suspected,
    unreachable,
)
from meshllm.v1 import mesh_pb2
from prometheus_client import CollectorRegistry

POLICY = SuspectPolicy(probe_timeout_s=1.0, reprobe_s=2.0)


def worker(name: str, started: float = 100.0) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", 1 << 30, 1, started)


def report(name: str, started: float = 100.0) -> SuspectReport:
    return SuspectReport(WorkerId(name), started, "gateway-1", "stream failed", 50.0)


def test_report_round_trip() -> None:
    sent = report("w1")
    assert parse_suspect(suspect_to_pb(sent).SerializeToString()) == sent


@pytest.mark.parametrize(("record", "why"), [
    (mesh_pb2.SuspectReport(reporter="g"), "without worker_id"),
    (mesh_pb2.SuspectReport(worker_id="w"), "without reporter"),
    (mesh_pb2.SuspectReport(worker_id="w", reporter="g", started_at_unix_s=float("nan")),
     "not finite"),
])
def test_invalid_reports_are_refused(record: mesh_pb2.SuspectReport, why: str) -> None:
    with pytest.raises(InvalidRecord, match=why):
        parse_suspect(record.SerializeToString())


def test_parse_inputs_reads_reports_by_worker() -> None:
    raw = {store.SUSPECTS + "w1": suspect_to_pb(report("w1")).SerializeToString(),
           store.SUSPECTS + "bad": b"\xff\xff"}
    assert parse_inputs(raw).suspects == {"w1": report("w1")}


@pytest.mark.parametrize(("reports", "named"), [
    ({}, []),
    ({"a": report("a")}, ["a"]),
    ({"a": report("a", started=99.0)}, []),          # made before a restarted a
    ({"a": report("a"), "gone": report("gone")}, ["a"]),  # gone: not a member any more
])
def test_a_report_names_one_instance(reports: dict[WorkerId, SuspectReport],
                                     named: list[str]) -> None:
    workers = [worker("a"), worker("b")]
    assert [w.worker_id for w in suspected(reports, workers)] == named


@pytest.mark.parametrize(("probes", "now", "checked"), [
    ({}, 10.0, ["a"]),                                         # never checked
    ({("a", 100.0): Probe(False, 9.0)}, 10.0, []),             # checked 1 s ago
    ({("a", 100.0): Probe(False, 8.0)}, 10.0, ["a"]),          # 2 s ago: again
    ({("a", 50.0): Probe(False, 9.5)}, 10.0, ["a"]),           # an earlier instance's check
])
def test_checks_are_due_once_per_reprobe(probes: dict[tuple[WorkerId, float], Probe],
                                         now: float, checked: list[str]) -> None:
    assert [w.worker_id for w in due([worker("a")], probes, now, POLICY)] == checked


@pytest.mark.parametrize(("probes", "out"), [
    ({}, set()),                                     # not checked yet: planned with
    ({("a", 100.0): Probe(True, 1.0)}, set()),       # answers: the report was wrong
    ({("a", 100.0): Probe(False, 1.0)}, {"a"}),
])
def test_only_a_failed_check_leaves_a_worker_out(
        probes: dict[tuple[WorkerId, float], Probe], out: set[str]) -> None:
    assert unreachable([worker("a")], probes) == out


class Checks:
    def __init__(self, answers: dict[str, bool]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, w: WorkerInfo) -> bool:
        self.asked.append(w.worker_id)
        return self.answers[w.worker_id]


async def test_the_planner_plans_around_a_reported_worker_that_does_not_answer() -> None:
    now = [0.0]
    checks = Checks({"dead": False, "alive": True})
    metrics = SuspectMetrics(CollectorRegistry())
    probes = SuspectProbes(checks, POLICY, metrics, clock=lambda: now[0])
    workers = [worker("dead"), worker("alive"), worker("unreported")]
    reports = {WorkerId("dead"): report("dead"), WorkerId("alive"): report("alive")}
    kept = await probes.reachable(workers, reports)
    assert [w.worker_id for w in kept] == ["alive", "unreported"]
    assert metrics.left_out._value.get() == 1
    now[0] = 1.0  # within reprobe_s: the last answers stand, nobody is asked
    assert await probes.reachable(workers, reports) == kept
    assert checks.asked == ["dead", "alive"]
    now[0], checks.answers["dead"] = 3.0, True  # it came back (a SIGSTOP ended)
    assert len(await probes.reachable(workers, reports)) == 3
    restarted = [worker("dead", started=200.0), *workers[1:]]  # a new process, same id
    checks.answers["dead"] = False
    assert len(await probes.reachable(restarted, reports)) == 3
    assert metrics.checks.labels("no answer")._value.get() == 1
    assert metrics.checks.labels("answered")._value.get() == 3  # alive twice, dead once
