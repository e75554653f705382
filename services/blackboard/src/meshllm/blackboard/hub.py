"""Fan-out of new posts to local subscribers (Subscribe streams).

Each subscriber has a bounded queue. One that falls that far behind is cut off with a
clear error rather than allowed to grow the node's memory without end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

from meshllm.common.blackboard.errors import SubscriberTooSlow
from meshllm.common.blackboard.types import Post, SubscribeFilter


def matches(wanted: SubscribeFilter, post: Post) -> bool:
    return ((not wanted.author or post.author == wanted.author)
            and (not wanted.tag or wanted.tag in post.tags)
            and (not wanted.channel or post.channel == wanted.channel))


class _Subscriber:
    def __init__(self, wanted: SubscribeFilter, capacity: int) -> None:
        self.wanted = wanted
        self.queue: asyncio.Queue[Post | None] = asyncio.Queue(capacity)
        self.overflowed = False


class Hub:
    def __init__(self, capacity: int = 1000) -> None:
        self._capacity = capacity
        self._subscribers: set[_Subscriber] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, posts: Iterable[Post]) -> None:
        for post in posts:
            for sub in list(self._subscribers):
                if not matches(sub.wanted, post):
                    continue
                try:
                    sub.queue.put_nowait(post)
                except asyncio.QueueFull:
                    sub.overflowed = True
                    self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (the node is shutting down)."""
        for sub in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        self._subscribers.clear()

    async def subscribe(self, wanted: SubscribeFilter) -> AsyncIterator[Post]:
        sub = _Subscriber(wanted, self._capacity)
        self._subscribers.add(sub)
        try:
            while True:
                if sub.overflowed and sub.queue.empty():
                    raise SubscriberTooSlow(
                        f"subscriber fell {self._capacity} posts behind and was cut off; "
                        "subscribe again and read the feed for what was missed")
                post = await sub.queue.get()
                if post is None:
                    return
                yield post
        finally:
            self._subscribers.discard(sub)
