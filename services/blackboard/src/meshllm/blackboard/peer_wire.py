"""What a node receives from its peers and from etcd, validated on arrival, and the
anti-entropy digest messages that only nodes exchange.

Posts from peers are untrusted until they pass `post_from_peer`; the plain conversions of
the client API are in `meshllm.common.blackboard.wire`.
"""

from __future__ import annotations

from meshllm.blackboard.digest import Bucket
from meshllm.blackboard.ids import is_post_id, ulid_time_ms
from meshllm.common.blackboard import wire
from meshllm.common.blackboard.types import Peer, Post
from meshllm.common.errors import InvalidRecord
from meshllm.common.records import decode_record
from meshllm.v1 import blackboard_pb2 as pb

# A hard protocol ceiling on a post's text, whatever a node's configured limit: peers
# may run different limits, and records beyond this are refused as malformed.
WIRE_MAX_TEXT_BYTES = 64 * 1024
WIRE_MAX_TAGS = 16
WIRE_MAX_FIELD_CHARS = 128
# Peers' clocks differ; a post from further in the future than this is refused rather
# than left to sit at the top of every feed.
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidRecord(what)


def check_post_record(m: pb.PostRecord, now_unix_ms: int) -> None:
    """InvalidRecord naming what is wrong with a post record from a peer, if anything."""
    _require(is_post_id(m.post_id), f"post id {m.post_id[:40]!r} is not a ULID")
    where = f"post {m.post_id}"
    _require(ulid_time_ms(m.post_id) == m.created_unix_ms, f"{where}: time differs from its id")
    _require(0 < len(m.author) <= WIRE_MAX_FIELD_CHARS, f"{where}: bad author")
    _require(0 < len(m.origin_node) <= WIRE_MAX_FIELD_CHARS, f"{where}: bad origin node")
    _require(len(m.text.encode()) <= WIRE_MAX_TEXT_BYTES, f"{where}: text too large")
    _require(len(m.tags) <= WIRE_MAX_TAGS, f"{where}: too many tags")
    _require(all(0 < len(t) <= WIRE_MAX_FIELD_CHARS for t in m.tags), f"{where}: bad tag")
    _require(len(m.channel) <= WIRE_MAX_FIELD_CHARS, f"{where}: bad channel")
    _require(not m.reply_to or is_post_id(m.reply_to), f"{where}: reply_to is not a post id")
    _require(m.created_unix_ms <= now_unix_ms + MAX_CLOCK_SKEW_MS, f"{where}: from the future")


def post_from_peer(m: pb.PostRecord, now_unix_ms: int) -> Post:
    """A post record from a peer, validated, as a Post."""
    check_post_record(m, now_unix_ms)
    return wire.post_from_pb(m)


def peer_from_record(raw: bytes) -> Peer:
    """A node's registration record, as read from etcd."""
    message = decode_record(pb.BlackboardPeer(), raw)
    _require(0 < len(message.node_id) <= WIRE_MAX_FIELD_CHARS, "peer record: bad node id")
    _require(":" in message.address,
             f"peer {message.node_id}: address {message.address!r} is not HOST:PORT")
    return wire.peer_from_pb(message)


def bucket_to_pb(b: Bucket) -> pb.DigestBucket:
    return pb.DigestBucket(start_unix_ms=b.start_unix_ms, count=b.count, hash=b.hash)


def bucket_from_pb(m: pb.DigestBucket) -> Bucket:
    return Bucket(m.start_unix_ms, m.count, bytes(m.hash))
