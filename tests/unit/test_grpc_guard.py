"""Requests whose bytes do not parse end INVALID_ARGUMENT with the malformed_message reason,
for every kind of method; well-formed ones reach the servicer as parsed messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from meshllm.common import grpc_errors, grpcutil
from meshllm.common.errors import MalformedMessage
from meshllm.v1 import worker_pb2

Ping, Pong = worker_pb2.PingRequest, worker_pb2.PingResponse
GARBAGE = b"\x00\xff"  # field number 0: never a valid message
WELL_FORMED = Ping(from_worker_id="w1").SerializeToString()


async def unary(request: Any, context: Any) -> Any:
    return Pong(worker_id=request.from_worker_id)


async def server_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield Pong(worker_id=request.from_worker_id)


async def client_stream(requests: AsyncIterator[Any], context: Any) -> Any:
    return Pong(worker_id=",".join([r.from_worker_id async for r in requests]))


async def bidi(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield Pong(worker_id=request.from_worker_id)


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary, Ping.FromString, Pong.SerializeToString),
    "ServerStream": grpc.unary_stream_rpc_method_handler(
        server_stream, Ping.FromString, Pong.SerializeToString),
    "ClientStream": grpc.stream_unary_rpc_method_handler(
        client_stream, Ping.FromString, Pong.SerializeToString),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi, Ping.FromString, Pong.SerializeToString),
}


async def call(channel: grpc.aio.Channel, kind: str, payload: bytes) -> list[bytes]:
    path, ident = f"/test.Echo/{kind}", {"request_serializer": None,
                                          "response_deserializer": None}
    if kind == "Unary":
        return [await channel.unary_unary(path, **ident)(payload, timeout=5)]
    if kind == "ServerStream":
        return [r async for r in channel.unary_stream(path, **ident)(payload, timeout=5)]
    if kind == "ClientStream":
        return [await channel.stream_unary(path, **ident)(iter([payload]), timeout=5)]
    return [r async for r in channel.stream_stream(path, **ident)(iter([payload]), timeout=5)]


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server, _, port = grpcutil.new_server("127.0.0.1:0")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", HANDLERS)])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(None)


@pytest.mark.parametrize("kind", sorted(HANDLERS))
async def test_garbage_is_a_typed_invalid_argument(channel: grpc.aio.Channel, kind: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(channel, kind, GARBAGE)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    error = grpc_errors.error_from_rpc(caught.value)
    assert isinstance(error, MalformedMessage)
    assert f"/test.Echo/{kind}" in str(error)


@pytest.mark.parametrize("kind", sorted(HANDLERS))
async def test_well_formed_requests_reach_the_servicer(channel: grpc.aio.Channel,
                                                       kind: str) -> None:
    replies = await call(channel, kind, WELL_FORMED)
    assert [Pong.FromString(r).worker_id for r in replies] == ["w1"]
