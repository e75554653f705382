"""Records from peers are validated before they are stored."""

from __future__ import annotations

import pytest
from meshllm.blackboard.ids import encode_ulid
from meshllm.common.blackboard_types import NodeId, Post, PostId
from meshllm.common.blackboard_wire import post_from_pb, post_to_pb
from meshllm.common.errors import InvalidRecord
from meshllm.v1 import blackboard_pb2 as pb

NOW = 1_800_000_000_000
GOOD = Post(encode_ulid(NOW, 7), "alice", NodeId("a"), NOW, "hi", ("x",), "ops",
            encode_ulid(NOW - 5, 1))


def test_round_trip() -> None:
    assert post_from_pb(post_to_pb(GOOD), NOW) == GOOD


def _record(**changes: object) -> pb.PostRecord:
    record = post_to_pb(GOOD)
    for key, value in changes.items():
        if key == "tags":
            del record.tags[:]
            record.tags.extend(value)  # type: ignore[arg-type]
        else:
            setattr(record, key, value)
    return record


@pytest.mark.parametrize(("changes", "error"), [
    ({"post_id": "not-an-id"}, "not a ULID"),
    ({"created_unix_ms": NOW + 1}, "time differs"),
    ({"author": ""}, "bad author"),
    ({"origin_node": ""}, "bad origin"),
    ({"text": "x" * 70_000}, "too large"),
    ({"tags": ["t"] * 17}, "too many tags"),
    ({"reply_to": "zzz"}, "reply_to"),
    ({"post_id": encode_ulid(NOW + 3_600_000, 1), "created_unix_ms": NOW + 3_600_000},
     "future"),
])
def test_bad_records_are_refused(changes: dict[str, object], error: str) -> None:
    with pytest.raises(InvalidRecord, match=error):
        post_from_pb(_record(**changes), NOW)


def test_reply_to_is_optional() -> None:
    assert post_from_pb(_record(reply_to=""), NOW).reply_to is None
    assert isinstance(GOOD.reply_to, str) and PostId(GOOD.reply_to) == GOOD.reply_to
