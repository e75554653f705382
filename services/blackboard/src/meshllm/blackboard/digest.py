"""Anti-entropy decisions: digests of time buckets, and from two digests what to fetch.

Posts never change, so a bucket is summarised by its count and a hash of its sorted ids.
Only buckets that differ are listed id by id, so two nodes that agree exchange a few
hundred bytes per round however many posts they hold.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshllm.blackboard.ids import ulid_time_ms
from meshllm.common.blackboard.types import PostId

BUCKET_WIDTH_MS = 10 * 60 * 1000
MAX_BUCKETS = 10_000  # a digest request beyond this is refused as unreasonable


@dataclass(frozen=True)
class Bucket:
    """The digest of the posts created in [start, start + width)."""

    start_unix_ms: int
    count: int
    hash: bytes


def bucket_start(created_unix_ms: int, width_ms: int) -> int:
    return created_unix_ms - created_unix_ms % width_ms


def make_buckets(ids: Iterable[PostId], width_ms: int) -> dict[int, Bucket]:
    grouped: dict[int, list[str]] = defaultdict(list)
    for post_id in ids:
        grouped[bucket_start(ulid_time_ms(post_id), width_ms)].append(post_id)
    buckets = {}
    for start, members in grouped.items():
        digest = hashlib.sha256("\n".join(sorted(members)).encode()).digest()[:16]
        buckets[start] = Bucket(start, len(members), digest)
    return buckets


def differing_buckets(mine: Mapping[int, Bucket], theirs: Sequence[Bucket]) -> tuple[int, ...]:
    """Starts of the peer's buckets that may hold posts this node lacks.

    A bucket the peer lacks is not listed: pulling only ever adds, and the peer will
    pull from us in its own rounds.
    """
    return tuple(sorted(
        b.start_unix_ms for b in theirs
        if b.count > 0 and (
            (own := mine.get(b.start_unix_ms)) is None or (own.count, own.hash) != (b.count, b.hash)
        )
    ))


def missing_ids(
    mine: set[PostId], theirs: Iterable[PostId], horizon_unix_ms: int
) -> tuple[PostId, ...]:
    """The peer's ids this node lacks and would keep, oldest first."""
    return tuple(sorted(
        i for i in set(theirs) if i not in mine and ulid_time_ms(i) >= horizon_unix_ms
    ))


def batches(ids: Sequence[PostId], size: int) -> list[tuple[PostId, ...]]:
    return [tuple(ids[i:i + size]) for i in range(0, len(ids), size)]
