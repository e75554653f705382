"""Which gRPC calls get spans: not health probes, not the split model's byte tunnel."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from meshllm.common.telemetry import instrument


@dataclass(frozen=True)
class CallDetails:  # what the interceptors hand the filter
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


@pytest.mark.parametrize(("method", "traced"), [
    ("/meshllm.v1.ShardWorker/Generate", True),
    ("/meshllm.v1.ShardWorker/Ping", True),
    ("/meshllm.v1.Planner/GetPlacement", True),
    ("/meshllm.v1.ShardWorker/Tunnel", False),
    ("/grpc.health.v1.Health/Check", False),
    ("/grpc.health.v1.Health/Watch", False),
])
def test_traced(method: str, traced: bool) -> None:
    assert instrument._traced(CallDetails(method)) is traced
