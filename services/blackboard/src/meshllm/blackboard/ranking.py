"""Search ranking: posts with more hits of the query words first, then newer first."""

from __future__ import annotations

import re
from collections.abc import Iterable

from meshllm.common.blackboard.types import Post, SearchHit

_WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_WORDS = 16


def query_words(query: str) -> tuple[str, ...]:
    """Distinct lower-case words of the query, in order, at most MAX_QUERY_WORDS."""
    words = dict.fromkeys(w.lower() for w in _WORD.findall(query))
    return tuple(words)[:MAX_QUERY_WORDS]


def count_hits(post: Post, words: tuple[str, ...]) -> int:
    """Occurrences of the words in the text and tags. A word matches the start of a
    post's word, so 'gossip' finds 'gossiping'."""
    tokens = [t.lower() for t in _WORD.findall(post.text)]
    tokens += [t.lower() for tag in post.tags for t in _WORD.findall(tag)]
    return sum(1 for t in tokens for w in words if t.startswith(w))


def rank(posts: Iterable[Post], words: tuple[str, ...], limit: int) -> list[SearchHit]:
    scored = [SearchHit(p, n) for p in posts if (n := count_hits(p, words)) > 0]
    scored.sort(key=lambda h: (h.hits, h.post.created_unix_ms, h.post.post_id), reverse=True)
    return scored[:limit]
