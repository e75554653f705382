"""The gateway's reports of a split that failed a stream: which workers, how often, and
that a report etcd cannot take is logged and never breaks the stream's recovery."""

from __future__ import annotations

from typing import cast

import pytest
from meshllm.common import store
from meshllm.common.store import KeyValueStore
from meshllm.common.suspects import parse_suspect
from meshllm.common.types import Assignment, Replica, WorkerId, WorkerInfo
from meshllm.gateway.suspects import REPORT_TTL_S, SuspectReporter, to_report

from tests.support.memory_kv import MemoryKv


def worker(name: str, started: float = 10.0) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", 1 << 30, 1, started)


def replica(*names: str) -> Replica:
    return Replica(tuple(Assignment(WorkerId(n), i, i + 1) for i, n in enumerate(names)))


WORKERS = {WorkerId(n): worker(n) for n in ("head", "stage", "other")}


@pytest.mark.parametrize(("failed", "reported"), [
    (replica("head", "stage"), ["head", "stage"]),  # either may be the dead one
    (replica("head"), []),                          # a whole replica: its lease will do
    (replica("head", "gone"), ["head"]),            # a stage the mesh has lost already
])
def test_a_failed_split_reports_its_workers(failed: Replica, reported: list[str]) -> None:
    assert [w.worker_id for w in to_report(failed, WORKERS)] == reported


async def test_reports_go_under_a_lease_once_per_instance() -> None:
    kv, now = MemoryKv(), [0.0]
    reporter = SuspectReporter(cast(KeyValueStore, kv), "gateway-1", clock=lambda: now[0],
                               wall_clock=lambda: 1234.0)
    reporter.report(to_report(replica("head", "stage"), WORKERS), "stream failed")
    reporter.report(to_report(replica("head", "stage"), WORKERS), "again at once")
    await reporter.drain()
    record = parse_suspect(kv.values[store.SUSPECTS + "stage"])
    assert (record.reporter, record.reason, record.started_at_unix_s) == (
        "gateway-1", "stream failed", 10.0)
    assert set(kv.leases.values()) == {REPORT_TTL_S} and len(kv.leases) == 1
    now[0] = 10.0  # later, the same instances are reported again
    reporter.report((worker("stage"),), "failed later")
    await reporter.drain()
    assert parse_suspect(kv.values[store.SUSPECTS + "stage"]).reason == "failed later"


async def test_a_re_planned_split_that_fails_is_reported_at_once() -> None:
    kv = MemoryKv()
    reporter = SuspectReporter(cast(KeyValueStore, kv), "gateway-1", clock=lambda: 0.0)
    reporter.report(to_report(replica("head", "stage"), WORKERS), "stage died")
    # moments later the split, re-planned onto the spare, fails too: its new stage died
    reporter.report(to_report(replica("head", "other"), WORKERS), "the spare died")
    await reporter.drain()
    assert parse_suspect(kv.values[store.SUSPECTS + "other"]).reason == "the spare died"
    assert parse_suspect(kv.values[store.SUSPECTS + "head"]).reason == "the spare died"


class DownKv(MemoryKv):
    async def grant_lease(self, ttl_s: int) -> int:
        raise ConnectionError("etcd is away")


async def test_a_report_etcd_cannot_take_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    reporter = SuspectReporter(cast(KeyValueStore, DownKv()), "gateway-1")
    reporter.report((worker("stage"),), "stream failed")
    await reporter.drain()
    assert "re-planned when their leases run out" in caplog.text
