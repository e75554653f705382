"""Hostile input for a gRPC service: random bytes and random well-formed messages for every
method of a service (found from its descriptor, so a new RPC is covered without a new test),
with random tracing metadata, sent over a real channel.

A call may fail in any typed way (INVALID_ARGUMENT, NOT_FOUND, ...), or with grpc's own
INTERNAL when the bytes do not parse; what must never happen is UNKNOWN (an exception that
escaped a servicer), a call that hangs past its deadline without a status, or a process that
stops answering its health check afterwards.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

MAX_DEPTH = 3
CALL_TIMEOUT_S = 3.0
# A stream that is going to fail fails at once; one that is not (a watch, a generation)
# is cut at its deadline, which is an answer too.
STREAM_TIMEOUT_S = 0.3
STREAM_MESSAGES = 3  # of a server stream read before giving up on it
_T = FieldDescriptor
INTS = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
UINTS = st.one_of(st.sampled_from([0, 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
INT64S = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
UINT64S = st.one_of(st.sampled_from([0, 2**64 - 1]), st.integers(0, 2**64 - 1))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "gemma3-270m", "\x00", "🦙" * 50]),
                 st.text(min_size=2000, max_size=5000))
SCALARS = {
    _T.TYPE_INT32: INTS, _T.TYPE_SINT32: INTS, _T.TYPE_SFIXED32: INTS,
    _T.TYPE_UINT32: UINTS, _T.TYPE_FIXED32: UINTS,
    _T.TYPE_INT64: INT64S, _T.TYPE_SINT64: INT64S, _T.TYPE_SFIXED64: INT64S,
    _T.TYPE_UINT64: UINT64S, _T.TYPE_FIXED64: UINT64S,
    _T.TYPE_BOOL: st.booleans(),
    _T.TYPE_FLOAT: st.floats(width=32), _T.TYPE_DOUBLE: st.floats(),
    _T.TYPE_STRING: TEXT, _T.TYPE_BYTES: st.binary(max_size=64),
}
# What the OpenTelemetry interceptors parse from every call, garbled.
TRACING_KEYS = ("traceparent", "tracestate", "baggage")
METADATA_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80)


def _field_value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[object]:
    if field.message_type is not None:
        return messages(field.message_type, depth + 1)
    if field.enum_type is not None:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-5, 1000))
    return SCALARS[field.type]


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, depth: int) -> Message:
    message = GetMessageClass(descriptor)()
    if depth > MAX_DEPTH:
        return message
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # maps: a random key/value pair adds little over the other fields
        if not draw(st.booleans()):
            continue
        value = _field_value(field, depth)
        if field.is_repeated:
            _extend(getattr(message, field.name), draw(st.lists(value, max_size=4)))
        elif field.type == _T.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(value))
        else:
            setattr(message, field.name, draw(value))
    return message


def _extend(container: object, values: list[object]) -> None:
    for value in values:
        if isinstance(value, Message):
            container.add().CopyFrom(value)  # type: ignore[attr-defined]
        else:
            container.append(value)  # type: ignore[attr-defined]


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    return _message(descriptor, depth)


def payloads(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Serialized requests for `method`: well-formed messages or plain garbage."""
    valid = messages(method.input_type).map(lambda m: m.SerializeToString())
    return st.one_of(valid, st.binary(max_size=256))


def metadata() -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    pairs = st.tuples(st.sampled_from(TRACING_KEYS), METADATA_VALUE)
    return st.lists(pairs, max_size=3).map(tuple)


def call(channel: grpc.Channel, service: str, method: MethodDescriptor,
         frames: list[bytes], meta: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """Send raw request bytes to `method` and return the status it ended with."""
    path = f"/{service}/{method.name}"
    ident = (lambda b: b, lambda b: b)
    timeout = STREAM_TIMEOUT_S if method.server_streaming else CALL_TIMEOUT_S
    try:
        if method.client_streaming:
            stub = channel.stream_stream(path, *ident) if method.server_streaming \
                else channel.stream_unary(path, *ident)
            answer = stub(iter(frames), timeout=timeout, metadata=meta)
        else:
            stub = channel.unary_stream(path, *ident) if method.server_streaming \
                else channel.unary_unary(path, *ident)
            answer = stub(frames[0], timeout=timeout, metadata=meta)
        if method.server_streaming:
            _drain(answer)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _drain(stream: Any) -> None:  # a grpc call: an iterator that can be cancelled
    for count, _ in enumerate(stream, 1):
        if count >= STREAM_MESSAGES:
            stream.cancel()
            return


def acceptable(code: grpc.StatusCode) -> bool:
    # CANCELLED: our own cancel of a long stream; DEADLINE_EXCEEDED: a stream that waits
    # for events (a watch) or a generation longer than the deadline. Both answered.
    return code is not grpc.StatusCode.UNKNOWN


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
