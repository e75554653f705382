"""Records from peers and etcd are validated before they are stored; the client API's
messages convert both ways without loss."""

from __future__ import annotations

import pytest
from meshllm.blackboard.digest import Bucket
from meshllm.blackboard.ids import encode_ulid
from meshllm.blackboard.peer_wire import (
    bucket_from_pb,
    bucket_to_pb,
    peer_from_record,
    post_from_peer,
)
from meshllm.common.blackboard import wire
from meshllm.common.blackboard.types import (
    BoardInfo,
    Draft,
    FeedQuery,
    NodeId,
    Peer,
    Post,
    PostId,
    SearchHit,
    SubscribeFilter,
)
from meshllm.common.errors import InvalidRecord
from meshllm.v1 import blackboard_pb2 as pb

NOW = 1_800_000_000_000
GOOD = Post(encode_ulid(NOW, 7), "alice", NodeId("a"), NOW, "hi", ("x",), "ops",
            encode_ulid(NOW - 5, 1))


def test_round_trip() -> None:
    assert post_from_peer(wire.post_to_pb(GOOD), NOW) == GOOD
    assert wire.post_from_pb(wire.post_to_pb(GOOD)) == GOOD


def _record(**changes: object) -> pb.PostRecord:
    record = wire.post_to_pb(GOOD)
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
        post_from_peer(_record(**changes), NOW)


def test_reply_to_is_optional() -> None:
    assert post_from_peer(_record(reply_to=""), NOW).reply_to is None
    assert isinstance(GOOD.reply_to, str) and PostId(GOOD.reply_to) == GOOD.reply_to


def test_peer_records_from_etcd_are_validated() -> None:
    peer = Peer(NodeId("a"), "10.0.0.1:9339", 12.5)
    assert peer_from_record(wire.peer_to_pb(peer).SerializeToString()) == peer
    with pytest.raises(InvalidRecord, match="undecodable"):
        peer_from_record(b"\xff\xff\xff")
    with pytest.raises(InvalidRecord, match="bad node id"):
        peer_from_record(wire.peer_to_pb(Peer(NodeId(""), "h:1")).SerializeToString())
    with pytest.raises(InvalidRecord, match="not HOST:PORT"):
        peer_from_record(wire.peer_to_pb(Peer(NodeId("a"), "nowhere")).SerializeToString())


def test_digest_buckets_round_trip() -> None:
    bucket = Bucket(600_000, 3, b"0123456789abcdef")
    assert bucket_from_pb(bucket_to_pb(bucket)) == bucket


def test_client_messages_round_trip() -> None:
    draft = Draft("bob", "text", ("t",), "ops", GOOD.post_id)
    assert wire.draft_from_pb(wire.draft_to_pb(draft)) == draft
    query = FeedQuery(5, "bob", "t", "ops", 20)
    assert wire.feed_query_from_pb(wire.feed_query_to_pb(query), 50, 1000) == query
    hit = SearchHit(GOOD, 2)
    assert wire.hit_from_pb(wire.hit_to_pb(hit)) == hit
    wanted = SubscribeFilter("bob", "t", "ops")
    assert wire.filter_from_pb(wire.filter_to_pb(wanted)) == wanted
    info = BoardInfo(NodeId("a"), 7, "h:1", (Peer(NodeId("b"), "h:2", 1.0),))
    assert wire.info_from_pb(wire.info_to_pb(info)) == info


def test_feed_limits_are_the_nodes() -> None:
    assert wire.feed_query_from_pb(pb.FeedRequest(), 50, 1000).limit == 50
    assert wire.feed_query_from_pb(pb.FeedRequest(limit=5000), 50, 1000).limit == 1000
    assert wire.feed_query_from_pb(pb.FeedRequest(since_unix_ms=-3), 50, 1000).since_unix_ms == 0
