"""Records read from etcd or a peer: decoded here, so that every undecodable one is the same
InvalidRecord, which readers skip and count, whatever its type."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from meshllm.common.errors import InvalidRecord

M = TypeVar("M", bound=Message)


def decode_record(message: M, raw: bytes) -> M:
    """`message` filled from `raw`; InvalidRecord naming the type when `raw` is no such
    record."""
    try:
        message.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidRecord(f"undecodable {type(message).__name__}: {exc}") from exc
    return message
