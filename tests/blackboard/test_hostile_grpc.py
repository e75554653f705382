"""Hostile gRPC input to a real blackboard node: random bytes, random well-formed requests
and garbled tracing metadata for every method, gossip included. Every call ends with a
status (never UNKNOWN), and the node still answers its health check and its peers."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshllm.v1 import blackboard_pb2

from tests.support import hostile
from tests.support.blackboard import BlackboardNode

SERVICE = blackboard_pb2.DESCRIPTOR.services_by_name["Blackboard"]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_every_method_answers_hostile_input_with_a_status(
        mesh: list[BlackboardNode], method_name: str) -> None:
    method = SERVICE.methods_by_name[method_name]
    frames = st.lists(hostile.payloads(method), min_size=0 if method.client_streaming else 1,
                      max_size=3 if method.client_streaming else 1)
    with grpc.insecure_channel(mesh[0].address) as channel:

        @FUZZ
        @given(frames=frames, meta=hostile.metadata())
        def check(frames: list[bytes], meta: tuple[tuple[str, str], ...]) -> None:
            code = hostile.call(channel, SERVICE.full_name, method, frames, meta)
            assert hostile.acceptable(code), f"{method_name} ended {code.name}"

        check()
        assert hostile.serving(channel)
    assert all(node.proc is not None and node.proc.alive() for node in mesh)
