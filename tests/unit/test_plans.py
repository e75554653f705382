"""What a worker must run for each model, from a snapshot: `assigned_plans` (pure)."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
from meshllm.worker.plans import (
    DrainStep,
    Held,
    HostPlan,
    Role,
    StagePeer,
    assigned_plans,
    drain_step,
    memory_wait,
)

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


def planned(*args: object, retiring: bool = False) -> HostPlan:
    """A plan as assigned_plans makes it: with the placement's required bytes (1 here)."""
    return replace(HostPlan(*args), retiring=retiring, required_bytes=1)  # type: ignore[arg-type]


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
         {M: planned(SPEC, Role.WHOLE, 0, 18)}),
    Case("a stage serves its own layers", snapshot((SPLIT,)), B,
         {M: planned(SPEC, Role.STAGE, 6, 12)}),
    Case("a head whose stages serve, through tunnels",
         snapshot((SPLIT,), worker(B, LoadState.READY), worker(C, LoadState.READY)), A,
         {M: planned(SPEC, Role.HEAD, 0, 6, (peer(B, 6, 12), peer(C, 12, 18)))}),
    Case("a head waits for a stage that is loading, and for one not yet seen",
         snapshot((SPLIT,), worker(B, LoadState.LOADING)), A,
         {M: planned(SPEC, Role.HEAD, 0, 6, (peer(B, 6, 12),), (B, C))}),
    Case("a head dials a stage directly where it accepts direct RPC",
         snapshot((SPLIT,), worker(B, LoadState.READY, "10.0.0.2", 5000),
                  worker(C, LoadState.READY)), A,
         {M: planned(SPEC, Role.HEAD, 0, 6,
                      (peer(B, 6, 12, "10.0.0.2:5000"), peer(C, 12, 18)))}),
    Case("a retiring replica's plan says so, for each of its stages",
         snapshot((replace(SPLIT, retiring=True),), worker(A, LoadState.READY)), C,
         {M: planned(SPEC, Role.STAGE, 12, 18, retiring=True)}),
    Case("a stage of a retiring replica whose head has unloaded goes at once",
         snapshot((replace(SPLIT, retiring=True),), worker(A)), C, {}),
    Case("a retiring whole replica is planned (its worker drains it)",
         snapshot((replace(whole(A, 18), retiring=True),)), A,
         {M: planned(SPEC, Role.WHOLE, 0, 18, retiring=True)}),
    Case("a live replica outranks a retiring one of the same model on this worker",
         snapshot((replace(whole(A, 18), retiring=True), SPLIT)), A,
         {M: planned(SPEC, Role.HEAD, 0, 6, (), (B, C))}),
    Case("... in either order",
         snapshot((SPLIT, replace(whole(A, 18), retiring=True))), A,
         {M: planned(SPEC, Role.HEAD, 0, 6, (), (B, C))}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_assigned_plans(case: Case) -> None:
    assert assigned_plans(case.mesh, case.me) == case.expected


def test_a_head_is_ready_to_load_only_when_no_stage_is_waited_for() -> None:
    ready = assigned_plans(CASES[4].mesh, A)[M]
    waiting = assigned_plans(CASES[5].mesh, A)[M]
    assert ready.ready_to_load and not waiting.ready_to_load


def test_only_a_change_of_retiring_drains_or_resumes_instead_of_restarting() -> None:
    live = planned(SPEC, Role.HEAD, 0, 6, (peer(B, 6, 12),))
    retired = replace(live, retiring=True)
    assert live.differs_only_in_retiring(retired) and retired.differs_only_in_retiring(live)
    assert not live.differs_only_in_retiring(live)
    assert not live.differs_only_in_retiring(replace(retired, peers=()))
    assert not live.differs_only_in_retiring(replace(retired, required_bytes=2))


# --- the memory gate: a new host loads once what the held ones take leaves room ---

GiB = 1024**3
X, Y, Z = ModelId("x"), ModelId("y"), ModelId("z")


@pytest.mark.parametrize(("held", "required", "expected"), [
    ((), 4 * GiB, ""),
    ((Held(X, 3 * GiB, False),), 5 * GiB, ""),                       # exactly fits
    ((Held(X, 3 * GiB, True),), 5 * GiB, ""),                        # fits beside a drainer
    ((Held(X, 6 * GiB, True),), 4 * GiB, "waiting for memory: draining x"),
    ((Held(X, 2 * GiB, True), Held(Y, 3 * GiB, False), Held(Z, 2 * GiB, True)), 4 * GiB,
     "waiting for memory: draining x, z"),
    ((Held(X, 7 * GiB, False),), 4 * GiB, ""),   # nothing will free memory: load anyway
], ids=["empty", "exact fit", "fits beside a draining host", "waits for the drainer",
        "names every drainer", "over budget with nothing draining loads"])
def test_memory_wait(held: tuple[Held, ...], required: int, expected: str) -> None:
    assert memory_wait(8 * GiB, held, required) == expected


# --- drain decisions: grace 2 s, timeout 600 s ---

@pytest.mark.parametrize(("role", "in_flight", "idle_s", "draining_s", "expected"), [
    (Role.WHOLE, 1, 0.0, 10.0, DrainStep.KEEP),     # a stream runs
    (Role.WHOLE, 0, 1.0, 1.0, DrainStep.KEEP),      # idle, but a late request may come
    (Role.WHOLE, 0, 2.0, 2.0, DrainStep.STOP),
    (Role.HEAD, 0, 2.5, 30.0, DrainStep.STOP),
    (Role.HEAD, 3, 0.0, 600.0, DrainStep.CUT),      # timed out with streams: cut them
    (Role.WHOLE, 0, 0.1, 600.0, DrainStep.STOP),    # timed out idle
    (Role.STAGE, 0, 100.0, 100.0, DrainStep.KEEP),  # a stage waits for its replica to go
    (Role.STAGE, 0, 600.0, 600.0, DrainStep.CUT),   # ... up to the timeout
], ids=["streaming", "within grace", "grace passed", "head grace passed",
        "timeout cuts", "timeout idle", "stage keeps", "stage timeout"])
def test_drain_step(role: Role, in_flight: int, idle_s: float, draining_s: float,
                    expected: DrainStep) -> None:
    assert drain_step(role, in_flight, idle_s, draining_s, 2.0, 600.0) is expected
