"""Where the gateway's backend feeds its demand meter: served requests (with the time in
a slot taken from dispatch to the last event while workers report none), refusals (every
replica busy, none ready), and requests waiting for a cold start."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from meshllm.common import store
from meshllm.common.demand import GatewayDemand, ModelDemand, demand_to_pb
from meshllm.common.meshview import parse_snapshot
from meshllm.common.types import LoadState, ModelId, ModelState
from meshllm.gateway.failures import NoLiveWorker, ReplicasBusy

from tests.unit.test_backend_failures import BUSY, OK, M, _events, mesh


async def test_served_requests_are_admitted_with_their_tokens_and_time() -> None:
    async with mesh(OK) as (backend, _):
        await _events(backend)
        await _events(backend)
        (demand,) = backend.demand.snapshot()
    assert demand.requests_per_s * demand.window_s == pytest.approx(2)
    assert demand.refused_per_s == 0
    assert demand.generated_tokens_per_s * demand.window_s == pytest.approx(4)
    assert demand.mean_service_s > 0  # the worker sent no service_s: dispatch to last event
    assert demand.mean_queue_wait_s == 0
    assert demand.recent_requests_per_s * demand.recent_s == pytest.approx(2)
    assert demand.waiting_requests == 0


async def test_every_replica_busy_is_a_refusal() -> None:
    async with mesh(BUSY, BUSY) as (backend, _):
        with pytest.raises(ReplicasBusy):
            await _events(backend)
        (demand,) = backend.demand.snapshot()
    assert demand.refused_per_s * demand.window_s == pytest.approx(1)
    assert demand.requests_per_s == 0


async def test_no_ready_replica_is_a_refusal() -> None:
    async with mesh(OK) as (backend, _):
        (worker,) = backend.snapshot.workers.values()
        loading = replace(worker, models=(ModelState(M, LoadState.LOADING),))
        backend.snapshot = replace(backend.snapshot, workers={worker.worker_id: loading})
        with pytest.raises(NoLiveWorker):
            await _events(backend)
        (demand,) = backend.demand.snapshot()
    assert demand.refused_per_s * demand.window_s == pytest.approx(1)


async def test_a_request_waiting_for_a_cold_start_is_counted_while_it_waits() -> None:
    async with mesh(OK) as (backend, _):
        backend.timing = replace(backend.timing, cold_start_wait_s=30.0)
        (worker,) = backend.snapshot.workers.values()
        loading = replace(worker, models=(ModelState(M, LoadState.LOADING),))
        ready = backend.snapshot
        backend.snapshot = replace(ready, workers={worker.worker_id: loading})
        task = asyncio.create_task(_events(backend))
        await asyncio.sleep(0.1)
        (demand,) = backend.demand.snapshot()
        assert demand.waiting_requests == 1
        backend.snapshot = ready
        backend._mesh_changed.set()  # what follow() does at a new snapshot
        await task
        (demand,) = backend.demand.snapshot()
    assert demand.waiting_requests == 0
    assert demand.requests_per_s * demand.window_s == pytest.approx(1)


async def test_status_shows_demand_and_reads_it_back() -> None:
    from meshllm.cli.status_cmd import render
    from meshllm.common.demand import ModelDemand
    from meshllm.common.status import MeshStatus, mesh_status

    demand = ModelDemand(M, window_s=60.0, requests_per_s=0.5, mean_service_s=2.0,
                         generated_tokens_per_s=12.5, waiting_requests=3)
    async with mesh(OK) as (backend, _):
        status = mesh_status(backend.snapshot, {M: demand})
        plain = mesh_status(backend.snapshot)
    doc = status.to_json()
    assert doc["models"][0]["demand"]["idle_s"] is None  # never requested: JSON has no inf
    assert doc["models"][0]["demand"]["waiting_requests"] == 3
    assert MeshStatus.from_json(doc) == status
    assert "demand" not in plain.to_json()["models"][0]  # the shape without a measurement
    assert MeshStatus.from_json(plain.to_json()) == plain
    text = render(status)
    assert "0.50 req/s" in text and "12.5 tok/s" in text and "3 waiting for a replica" in text


def test_the_mesh_view_holds_every_gateways_demand_record() -> None:
    record = GatewayDemand("gw-2", 1.0, (ModelDemand(ModelId("m"), 60.0, 2.0),), 60.0)
    snapshot = parse_snapshot({store.DEMAND + "gw-2": demand_to_pb(record).SerializeToString(),
                               store.DEMAND + "bad": b"\xff\xff"})
    assert snapshot.demand == {"gw-2": record}
