"""Typed errors across a real gRPC call: the status code of each family, and the reason
code and details that travel in trailing metadata and come back as the same error."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from meshllm.common import grpc_errors
from meshllm.common.errors import (
    ConfigError,
    EngineBusy,
    EngineCrashed,
    EngineUnavailable,
    InvalidGenerateRequest,
    InvalidRecord,
    MeshError,
    ModelNotFound,
    ModelSourceError,
    Overloaded,
    PromptTooLong,
)

METHOD = "/meshllm.test.Errors/Fail"


class LeaseLost(MeshError):
    """A service's own error family, with a detail of its own."""

    reason = "test_lease_lost"

    def __init__(self, message: str, lease_id: int) -> None:
        super().__init__(message)
        self.lease_id = lease_id

    def wire_details(self) -> Mapping[str, str]:
        return {"lease_id": str(self.lease_id), "held_by_node": "n-1"}

    @classmethod
    def from_wire(cls, message: str, details: Mapping[str, str]) -> MeshError:
        return cls(message, int(details["lease_id"]))


grpc_errors.register_status(LeaseLost, grpc.StatusCode.ABORTED)

CASES: list[tuple[str, MeshError, grpc.StatusCode]] = [
    ("invalid request", InvalidGenerateRequest("stop must be a string"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("prompt too long", PromptTooLong(5000, 4096), grpc.StatusCode.INVALID_ARGUMENT),
    ("invalid record", InvalidRecord("worker record without an id"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("config", ConfigError("--slots", "must be positive"), grpc.StatusCode.FAILED_PRECONDITION),
    ("model not found", ModelNotFound("no model gpt-9"), grpc.StatusCode.NOT_FOUND),
    ("overloaded", Overloaded("too much at once"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("engine busy", EngineBusy("queue full (16 waiting)"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("engine unavailable", EngineUnavailable("model m is loading on this worker"),
     grpc.StatusCode.UNAVAILABLE),
    ("engine crashed", EngineCrashed("exit code 134"), grpc.StatusCode.UNAVAILABLE),
    ("unlisted family", ModelSourceError("no such file"), grpc.StatusCode.INTERNAL),
    ("plain mesh error", MeshError("something else"), grpc.StatusCode.INTERNAL),
    ("registered family", LeaseLost("lease 7 expired", 7), grpc.StatusCode.ABORTED),
]
IDS = [c[0] for c in CASES]
ERRORS = {name: error for name, error, _ in CASES}


async def _fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    name = request.decode()
    if name == "no reason":
        await context.abort(grpc.StatusCode.UNAVAILABLE, "peer went away")
    await grpc_errors.abort(context, ERRORS[name])


@contextlib.asynccontextmanager
async def failing_server() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_fail)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "meshllm.test.Errors", {"Fail": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _call(channel: grpc.aio.Channel, name: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(METHOD)(name.encode(), timeout=10)
    return info.value


@pytest.mark.parametrize(("error", "status"), [c[1:] for c in CASES], ids=IDS)
def test_status_code_of_each_family(error: MeshError, status: grpc.StatusCode) -> None:
    assert grpc_errors.status_code(error) == status


@pytest.mark.parametrize(("name", "error", "status"), CASES, ids=IDS)
async def test_error_round_trips_through_trailing_metadata(
        name: str, error: MeshError, status: grpc.StatusCode) -> None:
    async with failing_server() as channel:
        failed = await _call(channel, name)
    assert failed.code() == status
    rebuilt = grpc_errors.error_from_rpc(failed)
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)
    assert rebuilt.wire_details() == error.wire_details()


async def test_details_keep_their_values() -> None:
    async with failing_server() as channel:
        too_long = grpc_errors.error_from_rpc(await _call(channel, "prompt too long"))
        lease = grpc_errors.error_from_rpc(await _call(channel, "registered family"))
    assert isinstance(too_long, PromptTooLong)
    assert (too_long.prompt_tokens, too_long.context_length) == (5000, 4096)
    assert isinstance(lease, LeaseLost) and lease.lease_id == 7


async def test_a_call_without_reason_is_no_typed_error() -> None:
    async with failing_server() as channel:
        failed = await _call(channel, "no reason")
    assert failed.code() == grpc.StatusCode.UNAVAILABLE
    assert grpc_errors.error_from_rpc(failed) is None


def test_trailing_metadata_names_reason_and_details() -> None:
    assert grpc_errors.trailing_metadata(PromptTooLong(10, 8)) == (
        (grpc_errors.REASON_KEY, "context_length_exceeded"),
        ("meshllm-error-prompt-tokens", "10"), ("meshllm-error-context-length", "8"))
