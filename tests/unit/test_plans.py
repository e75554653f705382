"""What a worker must run for each model, from a snapshot: `assigned_plans` (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.types import (
    Assignment,
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    Replica,
    WorkerId,
    WorkerInfo,
    whole,
)
from meshllm.worker.plans import HostPlan, Role, StagePeer, assigned_plans

M = ModelId("m")
SPEC = ModelSpec(M, "m.gguf", 1000, 18, 4096, 100, "gemma3", 32768)
A, B, C = WorkerId("a"), WorkerId("b"), WorkerId("c")
SPLIT = Replica((Assignment(A, 0, 6), Assignment(B, 6, 12), Assignment(C, 12, 18)))


def worker(worker_id: WorkerId, state: LoadState | None = None, rpc_host: str = "",
           rpc_port: int = 0) -> WorkerInfo:
    models = () if state is None else (ModelState(M, state, rpc_port=rpc_port),)
    return WorkerInfo(worker_id, f"{worker_id}:1", "cpu", 10**9, 1, 0.0, models,
                      rpc_host=rpc_host)


def snapshot(replicas: tuple[Replica, ...], *workers: WorkerInfo,
             with_spec: bool = True) -> MeshSnapshot:
    return MeshSnapshot({w.worker_id: w for w in workers}, {M: SPEC} if with_spec else {},
                        {M: Placement(M, replicas, 1)})


def peer(worker_id: WorkerId, start: int, end: int, endpoint: str = "") -> StagePeer:
    return StagePeer(worker_id, f"{worker_id}:1", endpoint, start, end)


@dataclass(frozen=True)
class Case:
    name: str
    mesh: MeshSnapshot
    me: WorkerId
    expected: dict[ModelId, HostPlan]


CASES = [
    Case("not placed here", snapshot((whole(A, 18),), worker(A)), B, {}),
    Case("placement without its model spec is skipped",
         snapshot((whole(A, 18),), worker(A), with_spec=False), A, {}),
    Case("a replica of the whole model", snapshot((whole(A, 18), whole(B, 18))), B,
         {M: HostPlan(SPEC, Role.WHOLE, 0, 18)}),
    Case("a stage serves its own layers", snapshot((SPLIT,)), B,
         {M: HostPlan(SPEC, Role.STAGE, 6, 12)}),
    Case("a head whose stages serve, through tunnels",
         snapshot((SPLIT,), worker(B, LoadState.READY), worker(C, LoadState.READY)), A,
         {M: HostPlan(SPEC, Role.HEAD, 0, 6, (peer(B, 6, 12), peer(C, 12, 18)))}),
    Case("a head waits for a stage that is loading, and for one not yet seen",
         snapshot((SPLIT,), worker(B, LoadState.LOADING)), A,
         {M: HostPlan(SPEC, Role.HEAD, 0, 6, (peer(B, 6, 12),), (B, C))}),
    Case("a head dials a stage directly where it accepts direct RPC",
         snapshot((SPLIT,), worker(B, LoadState.READY, "10.0.0.2", 5000),
                  worker(C, LoadState.READY)), A,
         {M: HostPlan(SPEC, Role.HEAD, 0, 6,
                      (peer(B, 6, 12, "10.0.0.2:5000"), peer(C, 12, 18)))}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_assigned_plans(case: Case) -> None:
    assert assigned_plans(case.mesh, case.me) == case.expected


def test_a_head_is_ready_to_load_only_when_no_stage_is_waited_for() -> None:
    ready = assigned_plans(CASES[4].mesh, A)[M]
    waiting = assigned_plans(CASES[5].mesh, A)[M]
    assert ready.ready_to_load and not waiting.ready_to_load
