"""Blackboard domain types that cross the client API: one frozen dataclass per concept.

Only `meshllm.common.blackboard.wire` knows the protobuf messages they map to.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NewType

PostId = NewType("PostId", str)
NodeId = NewType("NodeId", str)


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


class SearchMode(Enum):
    """How a search ranks posts; AUTO: hybrid when the node holds vectors, else words."""

    AUTO = "auto"
    WORDS = "words"
    SEMANTIC = "semantic"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class SearchHit:
    post: Post
    hits: int           # occurrences of the query words
    score: float = 0.0  # semantic: cosine; hybrid: the blend; words: 0


@dataclass(frozen=True)
class SearchResult:
    hits: tuple[SearchHit, ...]
    mode_used: SearchMode  # never AUTO
    note: str = ""         # why mode_used differs from the mode asked for, or ""


@dataclass(frozen=True)
class SubscribeFilter:
    """Which new posts a subscriber wants; an empty field matches every post."""

    author: str = ""
    tag: str = ""
    channel: str = ""


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
