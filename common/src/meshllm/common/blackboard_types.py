"""Blackboard domain types: one frozen dataclass per concept.

Services pass these around; only `blackboard_wire` knows the protobuf messages they map to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

PostId = NewType("PostId", str)
NodeId = NewType("NodeId", str)

# The etcd prefix under which every blackboard node registers itself.
PEERS_PREFIX = "/meshllm/blackboard/"
# A hard protocol ceiling on a post's text, whatever a node's configured limit: peers
# may run different limits, and records beyond this are refused as malformed.
WIRE_MAX_TEXT_BYTES = 64 * 1024
WIRE_MAX_TAGS = 16
WIRE_MAX_FIELD_CHARS = 128


@dataclass(frozen=True)
class Post:
    """A post as stored and replicated. Immutable: replicas never update a post."""

    post_id: PostId
    author: str
    origin_node: NodeId
    created_unix_ms: int
    text: str
    tags: tuple[str, ...] = ()
    channel: str = ""
    reply_to: PostId | None = None


@dataclass(frozen=True)
class Draft:
    """What a client asks to post; the node it reaches assigns id, origin and time."""

    author: str
    text: str
    tags: tuple[str, ...] = ()
    channel: str = ""
    reply_to: PostId | None = None


@dataclass(frozen=True)
class Accepted:
    post: Post
    redactions: tuple[str, ...] = ()  # kinds the scrubber replaced, e.g. "email"


@dataclass(frozen=True)
class FeedQuery:
    since_unix_ms: int = 0
    author: str = ""
    tag: str = ""
    channel: str = ""
    limit: int = 50


@dataclass(frozen=True)
class SearchHit:
    post: Post
    hits: int


@dataclass(frozen=True)
class SubscribeFilter:
    author: str = ""
    tag: str = ""
    channel: str = ""

    def matches(self, post: Post) -> bool:
        return (
            (not self.author or post.author == self.author)
            and (not self.tag or self.tag in post.tags)
            and (not self.channel or post.channel == self.channel)
        )


@dataclass(frozen=True)
class Peer:
    node_id: NodeId
    address: str
    started_at_unix_s: float = 0.0


@dataclass(frozen=True)
class BoardInfo:
    node_id: NodeId
    post_count: int
    address: str
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True)
class Bucket:
    """The digest of the posts created in [start, start + width)."""

    start_unix_ms: int
    count: int
    hash: bytes


@dataclass(frozen=True)
class IngestResult:
    stored: tuple[Post, ...] = ()
    duplicates: int = 0
    rejected: int = 0
