"""The one place where the client API's blackboard types meet protobuf messages, and the
JSON shape a post has over HTTP, in MCP tool results and in `--json` output.

Conversion only: records a node receives from its peers or etcd are validated by the
service (`meshllm.blackboard.peer_wire`) before they reach these functions.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from meshllm.common.blackboard.types import (
    BoardInfo,
    Draft,
    FeedQuery,
    NodeId,
    Peer,
    Post,
    PostId,
    SearchHit,
    SearchMode,
    SearchResult,
    SubscribeFilter,
)
from meshllm.v1 import blackboard_pb2 as pb


def post_to_pb(p: Post) -> pb.PostRecord:
    return pb.PostRecord(
        post_id=p.post_id, author=p.author, origin_node=p.origin_node,
        created_unix_ms=p.created_unix_ms, text=p.text, tags=list(p.tags),
        channel=p.channel, reply_to=p.reply_to or "",
    )


def post_from_pb(m: pb.PostRecord) -> Post:
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
    return pb.SearchHit(post=post_to_pb(h.post), hits=h.hits, score=h.score)


def hit_from_pb(m: pb.SearchHit) -> SearchHit:
    return SearchHit(post=post_from_pb(m.post), hits=m.hits, score=m.score)


_MODE_TO_PB = {
    SearchMode.AUTO: pb.SEARCH_MODE_UNSPECIFIED, SearchMode.WORDS: pb.SEARCH_MODE_WORDS,
    SearchMode.SEMANTIC: pb.SEARCH_MODE_SEMANTIC, SearchMode.HYBRID: pb.SEARCH_MODE_HYBRID,
}
_MODE_FROM_PB: dict[int, SearchMode] = {int(v): k for k, v in _MODE_TO_PB.items()}


def mode_to_pb(mode: SearchMode) -> pb.SearchMode:
    return _MODE_TO_PB[mode]


def mode_from_pb(value: int) -> SearchMode:
    """An unknown value (a newer client's mode) reads as AUTO: the node picks."""
    return _MODE_FROM_PB.get(int(value), SearchMode.AUTO)


def search_request_to_pb(query: str, limit: int, mode: SearchMode) -> pb.SearchRequest:
    return pb.SearchRequest(query=query, limit=limit, mode=mode_to_pb(mode))


def search_result_to_pb(r: SearchResult) -> pb.SearchReply:
    return pb.SearchReply(hits=[hit_to_pb(h) for h in r.hits],
                          mode_used=mode_to_pb(r.mode_used), note=r.note)


def search_result_from_pb(m: pb.SearchReply) -> SearchResult:
    return SearchResult(tuple(hit_from_pb(h) for h in m.hits), mode_from_pb(m.mode_used),
                        m.note)


def filter_to_pb(f: SubscribeFilter) -> pb.SubscribeRequest:
    return pb.SubscribeRequest(author=f.author, tag=f.tag, channel=f.channel)


def filter_from_pb(m: pb.SubscribeRequest) -> SubscribeFilter:
    return SubscribeFilter(author=m.author, tag=m.tag, channel=m.channel)


def peer_to_pb(p: Peer) -> pb.BlackboardPeer:
    return pb.BlackboardPeer(node_id=p.node_id, address=p.address,
                             started_at_unix_s=p.started_at_unix_s)


def peer_from_pb(m: pb.BlackboardPeer) -> Peer:
    return Peer(NodeId(m.node_id), m.address, m.started_at_unix_s)


def info_to_pb(i: BoardInfo) -> pb.BlackboardInfo:
    return pb.BlackboardInfo(node_id=i.node_id, post_count=i.post_count, address=i.address,
                             peers=[peer_to_pb(p) for p in i.peers])


def info_from_pb(m: pb.BlackboardInfo) -> BoardInfo:
    return BoardInfo(NodeId(m.node_id), m.post_count, m.address,
                     tuple(peer_from_pb(p) for p in m.peers))


# JSON: the one shape a post has over HTTP, in MCP tool results and in `--json` output.

def post_to_json(p: Post) -> dict[str, object]:
    return {
        "id": p.post_id, "object": "blackboard.post", "author": p.author,
        "origin_node": p.origin_node, "created_unix_ms": p.created_unix_ms, "text": p.text,
        "tags": list(p.tags), "channel": p.channel, "reply_to": p.reply_to,
    }


def hit_to_json(h: SearchHit) -> dict[str, object]:
    return {**post_to_json(h.post), "hits": h.hits, "score": round(h.score, 6)}


def search_result_to_json(r: SearchResult) -> dict[str, object]:
    """The HTTP and MCP shape of a search: the hits, and how they were ranked."""
    return {"object": "list", "data": [hit_to_json(h) for h in r.hits],
            "mode_used": r.mode_used.value, "note": r.note}


def parse_mode(text: str) -> SearchMode:
    """A mode from its name ('' = auto); ValueError names the valid ones."""
    try:
        return SearchMode(text.strip().lower() or "auto")
    except ValueError:
        names = ", ".join(m.value for m in SearchMode)
        raise ValueError(f"mode={text!r}: expected one of {names}") from None


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
