"""Workers reported unreachable in the status: which the status shows, left out or being
probed, in its JSON both ways and in `mesh-llm status`; the planner's reports on those it
leaves out, and their publication under LEFT_OUT."""

from __future__ import annotations

import copy
import json
from typing import Any, cast

import pytest
from meshllm.cli.status_cmd import render
from meshllm.common import store
from meshllm.common.errors import InvalidRecord
from meshllm.common.meshview import MeshSnapshot, parse_snapshot
from meshllm.common.status import MeshStatus, mesh_status
from meshllm.common.status_suspects import SuspectState, SuspectStatus, suspect_status
from meshllm.common.suspects import NO_ANSWER, PLANNER, SuspectReport, suspect_to_pb
from meshllm.common.types import ModelDeclaration, ModelSpec, WorkerId, WorkerInfo
from meshllm.planner.assign import RoundPolicy
from meshllm.planner.declared import ModelCatalog
from meshllm.planner.place import PlacementPolicy
from meshllm.planner.service import PlacementBoard, Planner, PlannerSettings
from meshllm.planner.suspects import SuspectMetrics, SuspectPolicy, SuspectProbes
from prometheus_client import CollectorRegistry

from tests.support.memory_kv import MemoryKv

W1, W2 = WorkerId("w1"), WorkerId("w2")
STARTED = 100.0
REPORTED = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
LEFT_OUT_AT = REPORTED + 2.0


def worker(worker_id: WorkerId, started: float = STARTED) -> WorkerInfo:
    return WorkerInfo(worker_id, f"{worker_id}:5000", "cpu", 1 << 30, 4, started)


def report(worker_id: WorkerId, started: float = STARTED) -> SuspectReport:
    return SuspectReport(worker_id, started, "gateway-1", "stream failed: EOF", REPORTED)


def verdict(worker_id: WorkerId, started: float = STARTED) -> SuspectReport:
    return SuspectReport(worker_id, started, PLANNER, NO_ANSWER, LEFT_OUT_AT)


def snapshot(reports: tuple[SuspectReport, ...] = (), verdicts: tuple[SuspectReport, ...] = (),
             workers: tuple[WorkerInfo, ...] = (worker(W1), worker(W2))) -> MeshSnapshot:
    return MeshSnapshot({w.worker_id: w for w in workers},
                        suspects={r.worker_id: r for r in reports},
                        left_out={v.worker_id: v for v in verdicts})


PROBING = SuspectStatus(W1, SuspectState.PROBING, REPORTED, "gateway-1", "stream failed: EOF")
LEFT_OUT = SuspectStatus(W1, SuspectState.LEFT_OUT, LEFT_OUT_AT, "gateway-1",
                         "stream failed: EOF")
CASES: dict[str, tuple[MeshSnapshot, tuple[SuspectStatus, ...]]] = {
    "none reported": (snapshot(), ()),
    "reported, being probed": (snapshot((report(W1),)), (PROBING,)),
    "reported, left out": (snapshot((report(W1),), (verdict(W1),)), (LEFT_OUT,)),
    "by worker id": (snapshot((report(W2), report(W1)), (verdict(W1),)),
                     (LEFT_OUT, SuspectStatus(W2, SuspectState.PROBING, REPORTED,
                                              "gateway-1", "stream failed: EOF"))),
    # The planner plans around a worker only while a gateway's report on it lives; its
    # record may outlive a planner that stopped.
    "planner's record without a report": (snapshot(verdicts=(verdict(W1),)), ()),
    "report on an earlier instance": (snapshot((report(W1, started=50.0),)), ()),
    "planner's record on an earlier instance": (
        snapshot((report(W1),), (verdict(W1, started=50.0),)), (PROBING,)),
    "worker gone from the mesh": (snapshot((report(W1),), workers=(worker(W2),)), ()),
}


@pytest.mark.parametrize(("mesh", "expected"), CASES.values(), ids=CASES.keys())
def test_the_status_shows_each_live_report(mesh: MeshSnapshot,
                                           expected: tuple[SuspectStatus, ...]) -> None:
    assert suspect_status(mesh) == expected
    assert mesh_status(mesh).suspects == expected


JSON_CASES: dict[str, tuple[MeshSnapshot, list[dict[str, Any]]]] = {
    "none": (snapshot(), []),
    "probing": (snapshot((report(W1),)), [
        {"worker_id": "w1", "state": "probing", "left_out": False, "since_unix_s": REPORTED,
         "reporter": "gateway-1", "reason": "stream failed: EOF"}]),
    "left out": (snapshot((report(W1),), (verdict(W1),)), [
        {"worker_id": "w1", "state": "left_out", "left_out": True,
         "since_unix_s": LEFT_OUT_AT, "reporter": "gateway-1",
         "reason": "stream failed: EOF"}]),
}


@pytest.mark.parametrize(("mesh", "expected"), JSON_CASES.values(), ids=JSON_CASES.keys())
def test_the_json_names_each_suspect_and_reads_back(mesh: MeshSnapshot,
                                                    expected: list[dict[str, Any]]) -> None:
    status = mesh_status(mesh)
    document = json.loads(json.dumps(status.to_json()))
    assert document["suspects"] == expected
    assert MeshStatus.from_json(document) == status


def test_a_document_without_suspects_has_none() -> None:
    """A gateway from before them."""
    document = mesh_status(snapshot((report(W1),))).to_json()
    del document["suspects"]
    assert MeshStatus.from_json(document).suspects == ()


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: s.update(state="gone"), "suspects[0].state"),
    (lambda s: s.pop("since_unix_s"), "suspects[0].since_unix_s"),
    (lambda s: s.update(reason=3), "suspects[0].reason"),
])
def test_a_malformed_suspect_names_its_field(change: Any, field: str) -> None:
    document = copy.deepcopy(mesh_status(snapshot((report(W1),))).to_json())
    change(document["suspects"][0])
    with pytest.raises(InvalidRecord, match=field.replace("[", r"\[").replace("]", r"\]")):
        MeshStatus.from_json(document)


TEXT_CASES: dict[str, tuple[MeshSnapshot, list[str]]] = {
    "none: no section": (snapshot(), []),
    "probing": (snapshot((report(W1),)), [
        "SUSPECTS (1, reported unreachable)",
        "  w1               being probed (still placed) since 22:13:20 UTC; "
        "reported by gateway-1: stream failed: EOF"]),
    "left out": (snapshot((report(W1),), (verdict(W1),)), [
        "SUSPECTS (1, reported unreachable)",
        "  w1               left out of placement (no answer to the planner's health "
        "check) since 22:13:22 UTC; reported by gateway-1: stream failed: EOF"]),
}


@pytest.mark.parametrize(("mesh", "expected"), TEXT_CASES.values(), ids=TEXT_CASES.keys())
def test_mesh_llm_status_prints_the_suspects_after_the_nodes(
        mesh: MeshSnapshot, expected: list[str]) -> None:
    lines = render(mesh_status(mesh)).splitlines()
    after_nodes = lines[3:lines.index("MODELS (0)")]  # NODES (2) and its two lines first
    assert after_nodes == expected


def test_the_snapshot_reads_reports_and_the_planners_records() -> None:
    raw = {store.SUSPECTS + "w1": suspect_to_pb(report(W1)).SerializeToString(),
           store.LEFT_OUT + "w1": suspect_to_pb(verdict(W1)).SerializeToString(),
           store.LEFT_OUT + "bad": b"\xff\xff"}
    mesh = parse_snapshot(raw)
    assert (mesh.suspects, mesh.left_out) == ({W1: report(W1)}, {W1: verdict(W1)})


async def test_the_planner_reports_those_it_leaves_out_since_the_first_failed_check(
        ) -> None:
    now, wall = [0.0], [LEFT_OUT_AT]
    answers = {W1: False, W2: True}

    async def check(w: WorkerInfo) -> bool:
        return answers[w.worker_id]

    probes = SuspectProbes(check, SuspectPolicy(1.0, 2.0),
                           SuspectMetrics(CollectorRegistry()), clock=lambda: now[0],
                           wall_clock=lambda: wall[0])
    workers, reports = [worker(W1), worker(W2)], {W1: report(W1), W2: report(W2)}
    await probes.reachable(workers, reports)
    assert probes.verdicts() == (verdict(W1),)
    now[0], wall[0] = 3.0, LEFT_OUT_AT + 3.0  # checked again, still no answer: same since
    await probes.reachable(workers, reports)
    assert probes.verdicts() == (verdict(W1),)
    answers[W1] = True  # it answers again: planned with, no longer reported as left out
    now[0] = 6.0
    await probes.reachable(workers, reports)
    assert probes.verdicts() == ()


class CountingKv(MemoryKv):
    def __init__(self, values: dict[str, bytes]) -> None:
        super().__init__(values)
        self.writes: list[str] = []

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        self.writes.append(f"put {key}")
        await super().put(key, value, lease_id)

    async def delete(self, key: str) -> None:
        self.writes.append(f"delete {key}")
        await super().delete(key)


async def never_checked(w: WorkerInfo) -> bool:
    raise AssertionError(f"{w.worker_id} was checked though nobody reported it")


def never_described(d: ModelDeclaration) -> ModelSpec:
    raise AssertionError(f"{d.model_id} was described though nothing is declared")


async def test_the_planner_publishes_its_reports_only_when_they_change() -> None:
    kv = CountingKv({store.LEFT_OUT + "w2": suspect_to_pb(verdict(W2)).SerializeToString()})
    planner = Planner(cast(store.KeyValueStore, kv),
                      PlannerSettings((), RoundPolicy(PlacementPolicy(0)), 0.0, 5.0),
                      ModelCatalog(never_described), PlacementBoard(),
                      SuspectProbes(never_checked, SuspectPolicy(1.0, 2.0),
                                    SuspectMetrics(CollectorRegistry())))
    await planner._publish_left_out((verdict(W1),))  # w2: an earlier planner's, cleared
    await planner._publish_left_out((verdict(W1),))  # unchanged: no write, no round
    assert kv.writes == [f"delete {store.LEFT_OUT}w2", f"put {store.LEFT_OUT}w1"]
    await planner._publish_left_out(())
    assert kv.writes[2:] == [f"delete {store.LEFT_OUT}w1"] and kv.values == {}
