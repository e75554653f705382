"""Blackboard errors across gRPC: the node ends a call with the error's status and reason
code, and the client rebuilds the same typed error (in process: one real gRPC server on
loopback, no child processes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from meshllm.blackboard.board import Board, BoardSettings
from meshllm.blackboard.gossip import Gossip, GossipSettings
from meshllm.blackboard.hub import Hub
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.rules import Limits
from meshllm.blackboard.servicer import BlackboardServicer
from meshllm.blackboard.storage import PostStore
from meshllm.common import grpc_errors
from meshllm.common.blackboard.client import BlackboardClient, error_from_rpc
from meshllm.common.blackboard.errors import (
    BlackboardError,
    BlackboardUnavailable,
    PostRejected,
    RateLimited,
    SecretDetected,
    SubscriberTooSlow,
    TextTooLarge,
)
from meshllm.common.blackboard.types import Draft, NodeId
from meshllm.common.errors import InvalidRecord, MeshError
from meshllm.common.grpcutil import new_server
from meshllm.v1 import blackboard_pb2 as pb
from meshllm.v1 import blackboard_pb2_grpc as pb_grpc

ADDRESS = "127.0.0.1:9"


def failed_call(code: grpc.StatusCode, details: str,
                trailing: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


def over_the_wire(error: MeshError) -> grpc.aio.AioRpcError:
    """The failed call a client sees when a servicer aborts with `error`."""
    return failed_call(grpc_errors.status_code(error), str(error),
                       grpc_errors.trailing_metadata(error))


@pytest.mark.parametrize(("error", "code"), [
    (PostRejected("text is empty"), grpc.StatusCode.INVALID_ARGUMENT),
    (TextTooLarge.for_sizes(5000, 4096), grpc.StatusCode.INVALID_ARGUMENT),
    (SecretDetected.for_findings(("github-token",)), grpc.StatusCode.INVALID_ARGUMENT),
    (RateLimited.for_author("a", 10, 3.25), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SubscriberTooSlow("fell behind"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BlackboardUnavailable("store closed"), grpc.StatusCode.UNAVAILABLE),
    (BlackboardError("bug"), grpc.StatusCode.INTERNAL),
])
def test_each_error_has_its_status_and_comes_back_as_itself(
        error: BlackboardError, code: grpc.StatusCode) -> None:
    assert grpc_errors.status_code(error) == code
    rebuilt = error_from_rpc(over_the_wire(error), ADDRESS)
    assert type(rebuilt) is type(error)
    assert (str(rebuilt), rebuilt.reason) == (str(error), error.reason)


def test_a_rate_limit_keeps_its_retry_time() -> None:
    rebuilt = error_from_rpc(over_the_wire(RateLimited.for_author("a", 10, 3.25)), ADDRESS)
    assert isinstance(rebuilt, RateLimited) and rebuilt.retry_after_s == 3.25
    assert RateLimited.from_wire("m", {"retry_after_s": "soon"}).retry_after_s == 0.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("code", "expected", "message"), [
    (grpc.StatusCode.UNAVAILABLE, BlackboardUnavailable, "cannot reach the blackboard at"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, BlackboardUnavailable, "check that the node runs"),
    (grpc.StatusCode.INTERNAL, BlackboardError, "failed: INTERNAL: boom"),
])
def test_a_call_without_a_reason_names_the_node(
        code: grpc.StatusCode, expected: type[BlackboardError], message: str) -> None:
    rebuilt = error_from_rpc(failed_call(code, "boom"), ADDRESS)
    assert type(rebuilt) is expected
    assert message in str(rebuilt) and ADDRESS in str(rebuilt)


def test_a_mesh_error_that_is_no_blackboard_error_is_still_one_for_callers() -> None:
    rebuilt = error_from_rpc(over_the_wire(InvalidRecord("bad bucket width")), ADDRESS)
    assert type(rebuilt) is BlackboardError
    assert "INVALID_ARGUMENT: bad bucket width" in str(rebuilt)


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[str]:
    """A board behind the real servicer on a loopback port, without etcd or peers."""
    node_id = NodeId("n")
    metrics = Metrics()
    store = PostStore(tmp_path, node_id)
    board = Board(BoardSettings(node_id, Limits(max_text_bytes=100,
                                                posts_per_author_per_minute=2)),
                  store, Hub(), metrics)
    gossip = Gossip(GossipSettings(node_id), board, metrics)
    server, _, port = new_server("127.0.0.1:0")
    pb_grpc.add_BlackboardServicer_to_server(BlackboardServicer(board, gossip, "x:1"), server)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await gossip.close()
        store.close()


async def test_the_node_refuses_with_typed_errors(node: str) -> None:
    async with BlackboardClient(node, timeout_s=5) as client:
        with pytest.raises(TextTooLarge, match="the limit is 100 bytes"):
            await client.post(Draft("a", "x" * 101))
        with pytest.raises(SecretDetected, match="github-token"):
            await client.post(Draft("a", "ghp_0123456789abcdefghijABCDEFGHIJ0123"))
        with pytest.raises(PostRejected, match="no words"):
            await client.search("  ")
        for i in range(2):
            await client.post(Draft("a", f"post {i}"))
        with pytest.raises(RateLimited) as limited:
            await client.post(Draft("a", "one too many"))
    assert 0 < limited.value.retry_after_s <= 60


async def test_peer_calls_out_of_bounds_are_invalid_arguments(node: str) -> None:
    async with grpc.aio.insecure_channel(node) as channel:
        stub = pb_grpc.BlackboardStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Digest(pb.DigestRequest(bucket_width_ms=10), timeout=5)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rebuilt = grpc_errors.error_from_rpc(failed.value)
    assert isinstance(rebuilt, InvalidRecord) and "below 1000 ms" in str(rebuilt)
