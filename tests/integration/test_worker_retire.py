"""A real engine behind the Worker: a stream in flight survives its replica being marked
retiring, the model then leaves the worker's record, and its Finished says how long it
queued and was served. The Worker is driven directly (no planner to rewrite the placement)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from grpc_health.v1 import health
from meshllm.common import convert
from meshllm.common.membership import Registration
from meshllm.common.types import (
    Finished,
    GenerateEvent,
    GenerateRequest,
    LoadState,
    ModelId,
    ModelSpec,
    RequestId,
    SamplingParams,
    TokenDelta,
    WorkerInfo,
)
from meshllm.v1 import mesh_pb2
from meshllm.worker.config import load_config
from meshllm.worker.engines import ProcessEngine
from meshllm.worker.hosts import HostDeps
from meshllm.worker.links import LinkMonitor
from meshllm.worker.plans import HostPlan, Role
from meshllm.worker.service import Worker
from meshllm.worker.stage import StageServer

pytestmark = pytest.mark.integration

M = ModelId("gemma3-270m")


class Records:
    def __init__(self) -> None:
        self.published: list[WorkerInfo] = []

    async def publish(self, value: bytes) -> bool:
        self.published.append(convert.worker_from_pb(mesh_pb2.WorkerRecord.FromString(value)))
        return True


async def test_a_stream_survives_its_replica_retiring_then_the_model_unloads(
        tmp_path: Path) -> None:
    config = load_config(["--worker-id", "w1", "--worker-memory", "1GiB", "--threads", "1",
                          "--drain-grace-s", "0.5"], dict(os.environ))

    def no_tunnels(*args: object) -> Any:
        raise AssertionError("a whole model needs no tunnel")

    deps = HostDeps(ProcessEngine, no_tunnels, StageServer, 1, "127.0.0.1", tmp_path,
                    False, False, restart_backoff_s=0.1, child_env=config.child_env)
    records = Records()
    worker = Worker(config, cast(Registration, records), health.aio.HealthServicer(), deps,
                    cast(LinkMonitor, SimpleNamespace(published={})))
    spec = ModelSpec(M, "gemma3-270m", 1, 18, 512, 1, "gemma3", 32768)
    live = HostPlan(spec, Role.WHOLE, 0, 18, required_bytes=400 * 2**20)
    try:
        await worker.apply({M: live})
        async with asyncio.timeout(120):
            while worker.hosts[M].state.state is not LoadState.READY:
                await asyncio.sleep(0.1)
        request = GenerateRequest(RequestId("r1"), M, "Count from one to fifty.", None,
                                  SamplingParams(max_tokens=60, temperature=0))
        events: list[GenerateEvent] = []
        async with asyncio.timeout(120):
            async for event in worker.generate(request):
                events.append(event)
                if len(events) == 1:
                    await worker.apply({M: replace(live, retiring=True)})
                    assert worker.record().model_state(M).draining  # type: ignore[union-attr]
        finished = events[-1]
        assert isinstance(finished, Finished) and finished.finish_reason == "length"
        assert sum(e.tokens for e in events if isinstance(e, TokenDelta)) == 60
        assert finished.service_s > 0 and finished.queued_s >= 0
        async with asyncio.timeout(30):  # it unloads, then publishes a record without it
            while not records.published or records.published[-1].model_state(M) is not None:
                await asyncio.sleep(0.1)
        assert M not in worker.hosts
        assert any(m.draining for r in records.published for m in r.models)
    finally:
        await worker.close()
