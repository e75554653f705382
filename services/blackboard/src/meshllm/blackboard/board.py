"""The board: one node's posts, its rules, and what it tells subscribers and peers.

The gRPC servicer calls this; this calls the pure rules and the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from meshllm.blackboard import digest, rules
from meshllm.blackboard.hub import Hub
from meshllm.blackboard.ids import IdGenerator
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.ranking import query_words, rank
from meshllm.blackboard.scrub import scrub
from meshllm.blackboard.storage import PostStore
from meshllm.common.blackboard.errors import PostRejected, SecretDetected
from meshllm.common.blackboard.types import (
    Accepted,
    Draft,
    FeedQuery,
    NodeId,
    Post,
    PostId,
    SearchHit,
    SubscribeFilter,
)

log = logging.getLogger(__name__)

SEARCH_CANDIDATES = 2000  # newest matching posts ranked per search


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class IngestResult:
    """What became of a batch of posts from a peer."""

    stored: tuple[Post, ...] = ()
    duplicates: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class BoardSettings:
    node_id: NodeId
    limits: rules.Limits
    redact_credentials: bool = False


class Board:
    def __init__(self, settings: BoardSettings, store: PostStore, hub: Hub, metrics: Metrics,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.settings = settings
        self._store = store
        self._hub = hub
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._ids = IdGenerator()
        self._on_local_post: list[Callable[[Post], None]] = []
        self._on_stored: list[Callable[[Sequence[Post]], None]] = []

    def on_local_post(self, callback: Callable[[Post], None]) -> None:
        """Called with every post accepted from a client here (gossip pushes it on)."""
        self._on_local_post.append(callback)

    def on_stored(self, callback: Callable[[Sequence[Post]], None]) -> None:
        """Called with the posts newly stored here, made here or learnt from a peer."""
        self._on_stored.append(callback)

    def _stored(self, posts: Sequence[Post]) -> None:
        if posts:
            for callback in self._on_stored:
                callback(posts)

    def post(self, draft: Draft) -> Accepted:
        try:
            accepted = self._accept(draft)
        except PostRejected as exc:
            self._metrics.posts_rejected.labels(reason=exc.reason).inc()
            raise
        self._store.insert([accepted.post])
        self._metrics.posts_accepted.inc()
        self._hub.publish([accepted.post])
        self._stored([accepted.post])
        for callback in self._on_local_post:
            callback(accepted.post)
        return accepted

    def _accept(self, draft: Draft) -> Accepted:
        limits = self.settings.limits
        draft = rules.normalise_draft(draft, limits)
        now = self._clock_ms()
        recent = self._store.author_times_since(draft.author, now - rules.RATE_WINDOW_MS)
        rules.check_rate(draft.author, recent, now, limits.posts_per_author_per_minute)
        scrubbed = scrub(draft.text, self.settings.redact_credentials)
        if scrubbed.refused:
            raise SecretDetected.for_findings(scrubbed.refused)
        post_id, created = self._ids.next(now)
        post = Post(post_id, draft.author, self.settings.node_id, created, scrubbed.text,
                    draft.tags, draft.channel, draft.reply_to)
        return Accepted(post, scrubbed.redacted)

    def ingest(self, posts: Sequence[Post]) -> IngestResult:
        """Store posts from a peer (already validated by the wire layer)."""
        horizon = self.horizon_ms()
        keep = [p for p in posts if p.created_unix_ms >= horizon]
        new, duplicates = self._store.insert(keep)
        self._hub.publish(new)
        self._stored(new)
        self._metrics.posts_ingested.inc(len(new))
        now = self._clock_ms()
        for post in new:  # clocks of other nodes may run ahead: a negative lag counts as 0
            self._metrics.gossip_lag_seconds.observe(max(now - post.created_unix_ms, 0) / 1000)
        return IngestResult(tuple(new), duplicates, len(posts) - len(keep))

    def feed(self, query: FeedQuery) -> list[Post]:
        return self._store.feed(query)

    def search(self, query: str, limit: int) -> list[SearchHit]:
        words = query_words(query)
        if not words:
            raise PostRejected("the search query has no words")
        return rank(self._store.search_candidates(words, SEARCH_CANDIDATES), words, limit)

    def word_candidates(self, words: tuple[str, ...]) -> list[Post]:
        return self._store.search_candidates(words, SEARCH_CANDIDATES)

    def subscribe(self, wanted: SubscribeFilter) -> AsyncIterator[Post]:
        return self._hub.subscribe(wanted)

    def horizon_ms(self) -> int:
        return rules.horizon_ms(self._clock_ms(), self.settings.limits, self._store.count(),
                                self._store.oldest_unix_ms())

    def digest(self, since_unix_ms: int, width_ms: int) -> list[digest.Bucket]:
        buckets = digest.make_buckets(self._store.ids_since(since_unix_ms), width_ms)
        return [buckets[k] for k in sorted(buckets)]

    def ids_in(self, since_unix_ms: int, width_ms: int, starts: Sequence[int]) -> list[PostId]:
        ranges = [(max(s, since_unix_ms), s + width_ms) for s in starts]
        return self._store.ids_between(ranges)

    def held_ids(self, since_unix_ms: int) -> set[PostId]:
        return set(self._store.ids_since(since_unix_ms))

    def fetch(self, ids: Sequence[PostId]) -> list[Post]:
        return self._store.get(ids)

    def count(self) -> int:
        return self._store.count()

    def prune(self) -> int:
        limits = self.settings.limits
        dropped = self._store.prune(self._clock_ms() - limits.retention_ms, limits.max_posts)
        if dropped:
            log.info("expired %d posts (retention %.1f h, at most %d posts)", dropped,
                     limits.retention_ms / 3_600_000, limits.max_posts)
        self._metrics.posts_expired.inc(dropped)
        return dropped
