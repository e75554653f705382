"""The node's rules as pure functions: draft validation, limits, retention horizon."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from meshllm.blackboard.ids import is_post_id
from meshllm.blackboard.peer_wire import WIRE_MAX_FIELD_CHARS, WIRE_MAX_TAGS, WIRE_MAX_TEXT_BYTES
from meshllm.common.blackboard.errors import PostRejected, RateLimited, TextTooLarge
from meshllm.common.blackboard.types import Draft

RATE_WINDOW_MS = 60_000


@dataclass(frozen=True)
class Limits:
    max_text_bytes: int = 4096
    posts_per_author_per_minute: int = 10
    retention_ms: int = 48 * 3600 * 1000
    max_posts: int = 100_000

    def __post_init__(self) -> None:
        if not 0 < self.max_text_bytes <= WIRE_MAX_TEXT_BYTES:
            raise ValueError(f"max text bytes must be in 1..{WIRE_MAX_TEXT_BYTES}")


def _check_field(name: str, value: str, required: bool) -> None:
    if required and not value.strip():
        raise PostRejected(f"{name} is required")
    if len(value) > WIRE_MAX_FIELD_CHARS:
        raise PostRejected(f"{name} is {len(value)} characters; at most {WIRE_MAX_FIELD_CHARS}")
    if any(c.isspace() for c in value.strip()) and name != "author":
        raise PostRejected(f"{name} {value!r} must not contain spaces")


def normalise_draft(draft: Draft, limits: Limits) -> Draft:
    """The draft with tags cleaned up, or PostRejected saying what is wrong."""
    if not draft.text.strip():
        raise PostRejected("text is empty")
    size = len(draft.text.encode())
    if size > limits.max_text_bytes:
        raise TextTooLarge.for_sizes(size, limits.max_text_bytes)
    tags = tuple(dict.fromkeys(t.strip().lower().lstrip("#") for t in draft.tags if t.strip()))
    if len(tags) > WIRE_MAX_TAGS:
        raise PostRejected(f"{len(tags)} tags; at most {WIRE_MAX_TAGS}")
    _check_field("author", draft.author, required=True)
    for tag in tags:
        _check_field("tag", tag, required=True)
    _check_field("channel", draft.channel, required=False)
    if draft.reply_to is not None and not is_post_id(draft.reply_to):
        raise PostRejected(f"reply_to {draft.reply_to!r} is not a post id")
    return replace(draft, author=draft.author.strip(), tags=tags, channel=draft.channel.strip())


def rate_limit_retry_after_s(
    recent_unix_ms: Sequence[int], now_unix_ms: int, limit: int
) -> float | None:
    """None if one more post fits in the sliding minute; else seconds until it does."""
    in_window = sorted(t for t in recent_unix_ms if t > now_unix_ms - RATE_WINDOW_MS)
    if len(in_window) < limit:
        return None
    # The post that must leave the window before one more fits.
    freeing = in_window[len(in_window) - limit]
    return max(0.0, (freeing + RATE_WINDOW_MS - now_unix_ms) / 1000)


def check_rate(author: str, recent_unix_ms: Sequence[int], now_unix_ms: int, limit: int) -> None:
    retry = rate_limit_retry_after_s(recent_unix_ms, now_unix_ms, limit)
    if retry is not None:
        raise RateLimited.for_author(author, limit, retry)


def horizon_ms(now_unix_ms: int, limits: Limits, held: int, oldest_held_ms: int | None) -> int:
    """Posts created before this are not kept here, so not fetched from peers either.

    When the node is full, a post older than everything it holds would be evicted at
    once; fetching it again on every anti-entropy round would be wasted work.
    """
    cutoff = now_unix_ms - limits.retention_ms
    if held >= limits.max_posts and oldest_held_ms is not None:
        cutoff = max(cutoff, oldest_held_ms + 1)
    return cutoff
