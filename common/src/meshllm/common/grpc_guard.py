"""Requests whose bytes do not parse end with INVALID_ARGUMENT, not UNKNOWN.

grpc.aio parses a request before the servicer runs and treats a parse failure like an
exception escaping the servicer: status UNKNOWN and a traceback in the log for every such
call, so a port scanner or a client built from other protos fills the log with what look
like our bugs. The guard takes the parsing over: the method receives the raw bytes, parses
them itself, and answers a malformed one with a typed MalformedMessage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from meshllm.common import grpc_errors
from meshllm.common.errors import MalformedMessage

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Parse = Callable[[bytes], Any]


class MalformedRequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return guarded(handler, str(details.method))


def guarded(handler: Any, method: str) -> Any:
    """The same handler, fed raw bytes that it parses with its own deserializer."""
    parse: Parse = handler.request_deserializer
    respond = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _unary_unary(handler.unary_unary, parse, method), None, respond)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _unary_stream(handler.unary_stream, parse, method), None, respond)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _stream_unary(handler.stream_unary, parse, method), None, respond)
    return grpc.stream_stream_rpc_method_handler(
        _stream_stream(handler.stream_stream, parse, method), None, respond)


async def _parsed(raw: bytes, parse: Parse, method: str, context: Context) -> Any:
    try:
        return parse(raw)
    except Exception as exc:  # DecodeError, or whatever a generated parser raises
        await grpc_errors.abort(context, MalformedMessage(
            f"{method}: the request is not a valid message of its type ({exc})"))


async def _each_parsed(requests: AsyncIterator[bytes], parse: Parse, method: str,
                       context: Context) -> AsyncIterator[Any]:
    async for raw in requests:
        yield await _parsed(raw, parse, method, context)


def _unary_unary(behaviour: Any, parse: Parse, method: str) -> Any:
    async def run(raw: bytes, context: Context) -> Any:
        return await behaviour(await _parsed(raw, parse, method, context), context)
    return run


def _unary_stream(behaviour: Any, parse: Parse, method: str) -> Any:
    async def run(raw: bytes, context: Context) -> AsyncIterator[Any]:
        async for reply in behaviour(await _parsed(raw, parse, method, context), context):
            yield reply
    return run


def _stream_unary(behaviour: Any, parse: Parse, method: str) -> Any:
    async def run(requests: AsyncIterator[bytes], context: Context) -> Any:
        return await behaviour(_each_parsed(requests, parse, method, context), context)
    return run


def _stream_stream(behaviour: Any, parse: Parse, method: str) -> Any:
    async def run(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        async for reply in behaviour(_each_parsed(requests, parse, method, context), context):
            yield reply
    return run
