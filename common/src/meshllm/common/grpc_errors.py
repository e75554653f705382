"""Typed errors across gRPC: a servicer aborts with the error's status code and its reason
code in trailing metadata; a client rebuilds the same typed error from them.

The status code tells gRPC-level tooling what kind of failure it was; the reason code
tells our own callers exactly which error, without reading messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import grpc
from meshllm.common.errors import (
    ConfigError,
    EngineUnavailable,
    InvalidGenerateRequest,
    InvalidRecord,
    MalformedMessage,
    MeshError,
    ModelNotFound,
    Overloaded,
    rebuild,
)

REASON_KEY = "meshllm-error"
DETAIL_PREFIX = "meshllm-error-"

# The most specific class in an error's MRO that is listed here decides its status code.
STATUS_CODES: dict[type[MeshError], grpc.StatusCode] = {
    InvalidGenerateRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRecord: grpc.StatusCode.INVALID_ARGUMENT,
    MalformedMessage: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def register_status(error: type[MeshError], code: grpc.StatusCode) -> None:
    """A service's own error family and its status code (called at import of the module
    that defines the errors)."""
    STATUS_CODES[error] = code


def status_code(error: MeshError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def trailing_metadata(error: MeshError) -> tuple[tuple[str, str], ...]:
    details = tuple((DETAIL_PREFIX + key.replace("_", "-"), value)
                    for key, value in error.wire_details().items())
    return ((REASON_KEY, error.reason), *details)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: MeshError) -> NoReturn:
    """End the call with `error`'s status, message and reason code."""
    await context.abort(status_code(error), str(error), trailing_metadata=trailing_metadata(error))
    raise AssertionError("context.abort returned")  # it raises; this keeps mypy honest


def _metadata(exc: grpc.aio.AioRpcError) -> Mapping[str, str]:
    return {str(key): str(value) for key, value in exc.trailing_metadata() or ()}


def error_from_rpc(exc: grpc.aio.AioRpcError) -> MeshError | None:
    """The typed error a failed call carried, or None when it carried none (the peer
    vanished, a deadline passed, a transport failure): the caller decides what that means."""
    metadata = _metadata(exc)
    reason = metadata.get(REASON_KEY)
    if reason is None:
        return None
    details = {key[len(DETAIL_PREFIX):].replace("-", "_"): value
               for key, value in metadata.items() if key.startswith(DETAIL_PREFIX)}
    return rebuild(reason, exc.details() or exc.code().name, details)
