"""The one place where blackboard domain types meet protobuf messages.

Parsing validates: posts from peers are untrusted until they pass `post_from_pb`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from meshllm.common.blackboard_types import (
    WIRE_MAX_FIELD_CHARS,
    WIRE_MAX_TAGS,
    WIRE_MAX_TEXT_BYTES,
    BoardInfo,
    Bucket,
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

# Crockford base32, as ULIDs use: sortable, no ambiguous letters (I, L, O, U).
ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
# Peers' clocks differ; a post from further in the future than this is refused rather
# than left to sit at the top of every feed.
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidRecord(what)


def ulid_time_ms(post_id: str) -> int:
    """The creation time encoded in the first 10 characters of a ULID."""
    value = 0
    for char in post_id[:10]:
        value = value * 32 + ULID_ALPHABET.index(char)
    return value


def is_post_id(text: str) -> bool:
    return bool(_ULID.match(text)) and text[0] <= "7"  # 48-bit time: first char <= 7


def post_to_pb(p: Post) -> pb.PostRecord:
    return pb.PostRecord(
        post_id=p.post_id, author=p.author, origin_node=p.origin_node,
        created_unix_ms=p.created_unix_ms, text=p.text, tags=list(p.tags),
        channel=p.channel, reply_to=p.reply_to or "",
    )


def post_from_pb(m: pb.PostRecord, now_unix_ms: int | None = None) -> Post:
    """Validate and convert a post record (from a peer, or from our own node)."""
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
    if now_unix_ms is not None:
        _require(m.created_unix_ms <= now_unix_ms + MAX_CLOCK_SKEW_MS, f"{where}: from the future")
    return Post(
        post_id=PostId(m.post_id), author=m.author, origin_node=NodeId(m.origin_node),
        created_unix_ms=m.created_unix_ms, text=m.text, tags=tuple(m.tags),
        channel=m.channel, reply_to=PostId(m.reply_to) if m.reply_to else None,
    )


def draft_to_pb(d: Draft) -> pb.PostRequest:
    return pb.PostRequest(author=d.author, text=d.text, tags=list(d.tags), channel=d.channel,
                          reply_to=d.reply_to or "")


def draft_from_pb(m: pb.PostRequest) -> Draft:
    """Drafts are checked by the node's rules (limits, scrubber), not here."""
    return Draft(author=m.author, text=m.text, tags=tuple(m.tags), channel=m.channel,
                 reply_to=PostId(m.reply_to) if m.reply_to else None)


def feed_query_to_pb(q: FeedQuery) -> pb.FeedRequest:
    return pb.FeedRequest(since_unix_ms=q.since_unix_ms, author=q.author, tag=q.tag,
                          channel=q.channel, limit=q.limit)


def feed_query_from_pb(m: pb.FeedRequest, default_limit: int, max_limit: int) -> FeedQuery:
    limit = min(m.limit or default_limit, max_limit)
    return FeedQuery(since_unix_ms=max(0, m.since_unix_ms), author=m.author, tag=m.tag,
                     channel=m.channel, limit=limit)


def hit_to_pb(h: SearchHit) -> pb.SearchHit:
    return pb.SearchHit(post=post_to_pb(h.post), hits=h.hits)


def hit_from_pb(m: pb.SearchHit) -> SearchHit:
    return SearchHit(post=post_from_pb(m.post), hits=m.hits)


def filter_to_pb(f: SubscribeFilter) -> pb.SubscribeRequest:
    return pb.SubscribeRequest(author=f.author, tag=f.tag, channel=f.channel)


def filter_from_pb(m: pb.SubscribeRequest) -> SubscribeFilter:
    return SubscribeFilter(author=m.author, tag=m.tag, channel=m.channel)


def peer_to_pb(p: Peer) -> pb.BlackboardPeer:
    return pb.BlackboardPeer(node_id=p.node_id, address=p.address,
                             started_at_unix_s=p.started_at_unix_s)


def peer_from_pb(m: pb.BlackboardPeer) -> Peer:
    _require(0 < len(m.node_id) <= WIRE_MAX_FIELD_CHARS, "peer record: bad node id")
    _require(":" in m.address, f"peer {m.node_id}: address {m.address!r} is not HOST:PORT")
    return Peer(NodeId(m.node_id), m.address, m.started_at_unix_s)


def parse_peer(raw: bytes) -> Peer:
    message = pb.BlackboardPeer()
    try:
        message.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidRecord(f"undecodable BlackboardPeer: {exc}") from exc
    return peer_from_pb(message)


def info_to_pb(i: BoardInfo) -> pb.BlackboardInfo:
    return pb.BlackboardInfo(node_id=i.node_id, post_count=i.post_count, address=i.address,
                             peers=[peer_to_pb(p) for p in i.peers])


def info_from_pb(m: pb.BlackboardInfo) -> BoardInfo:
    return BoardInfo(NodeId(m.node_id), m.post_count, m.address,
                     tuple(peer_from_pb(p) for p in m.peers))


def bucket_to_pb(b: Bucket) -> pb.DigestBucket:
    return pb.DigestBucket(start_unix_ms=b.start_unix_ms, count=b.count, hash=b.hash)


def bucket_from_pb(m: pb.DigestBucket) -> Bucket:
    return Bucket(m.start_unix_ms, m.count, bytes(m.hash))


# JSON: the one shape a post has over HTTP, in MCP tool results and in `--json` output.

def post_to_json(p: Post) -> dict[str, object]:
    return {
        "id": p.post_id, "object": "blackboard.post", "author": p.author,
        "origin_node": p.origin_node, "created_unix_ms": p.created_unix_ms, "text": p.text,
        "tags": list(p.tags), "channel": p.channel, "reply_to": p.reply_to,
    }


def hit_to_json(h: SearchHit) -> dict[str, object]:
    return {**post_to_json(h.post), "hits": h.hits}


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_since(text: str, now_unix_ms: int) -> int:
    """A 'since' bound in unix ms, from unix seconds ('1767225600'), an ISO 8601 time
    ('2026-01-01T00:00:00Z') or an age ('15m', '2h', '1d')."""
    text = text.strip()
    if not text:
        return 0
    if relative := _RELATIVE.match(text):
        return now_unix_ms - int(float(relative.group(1)) * _UNIT_MS[relative.group(2)])
    try:
        return int(float(text) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(
            f"since={text!r}: expected unix seconds, an ISO 8601 time or an age like 15m, 2h"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
