"""The blackboard's decisions as pure functions, table-driven."""

from __future__ import annotations

import random

import pytest
from meshllm.blackboard.config import load_config
from meshllm.blackboard.digest import Bucket, differing_buckets, make_buckets, missing_ids
from meshllm.blackboard.gossip import choose_peers, peer_changes
from meshllm.blackboard.ids import IdGenerator, encode_ulid, is_post_id, ulid_time_ms
from meshllm.blackboard.ranking import query_words, rank
from meshllm.blackboard.rules import Limits, horizon_ms, normalise_draft, rate_limit_retry_after_s
from meshllm.common.blackboard.errors import PostRejected, TextTooLarge
from meshllm.common.blackboard.types import Draft, NodeId, Peer, Post, PostId
from meshllm.common.blackboard.wire import parse_since
from meshllm.common.errors import ConfigError

MIN = 60_000


def post(ms: int, text: str = "x", n: int = 0) -> Post:
    return Post(encode_ulid(ms, n), "a", NodeId("n"), ms, text)


@pytest.mark.parametrize(("recent", "now", "limit", "expected"), [
    ([], 100 * MIN, 3, None),
    ([99 * MIN + 1, 99 * MIN + 2], 100 * MIN, 3, None),
    ([99 * MIN + 1000, 99 * MIN + 2000, 99 * MIN + 3000], 100 * MIN, 3, 1.0),
    ([10, 20, 30], 100 * MIN, 3, None),                     # all outside the window
    ([99 * MIN + 6000] * 5, 100 * MIN, 3, 6.0),             # over the limit: the right one
])
def test_rate_limit(recent: list[int], now: int, limit: int, expected: float | None) -> None:
    assert rate_limit_retry_after_s(recent, now, limit) == expected


@pytest.mark.parametrize(("draft", "error"), [
    (Draft("a", ""), "text is empty"),
    (Draft("a", "x" * 101), "the limit is 100 bytes"),
    (Draft("a", "é" * 51), "102 bytes"),                   # bytes, not characters
    (Draft(" ", "hi"), "author is required"),
    (Draft("a", "hi", tags=("two words",)), "must not contain spaces"),
    (Draft("a", "hi", tags=tuple(str(i) for i in range(17))), "at most 16"),
    (Draft("a", "hi", reply_to=PostId("nope")), "not a post id"),
])
def test_bad_drafts_are_refused_with_the_reason(draft: Draft, error: str) -> None:
    with pytest.raises(PostRejected, match=error):
        normalise_draft(draft, Limits(max_text_bytes=100))


def test_text_too_large_is_its_own_error() -> None:
    with pytest.raises(TextTooLarge):
        normalise_draft(Draft("a", "x" * 5000), Limits())


def test_tags_are_normalised() -> None:
    draft = normalise_draft(Draft("a", "hi", tags=("#GPU", "gpu", " ops ")), Limits())
    assert draft.tags == ("gpu", "ops")


@pytest.mark.parametrize(("held", "oldest", "expected"), [
    (5, 1000, 10_000 - 5000),          # room left: retention decides
    (10, 1000, 10_000 - 5000),         # full, but the oldest is older than retention
    (10, 7000, 7001),                  # full: nothing older than what we hold
    (0, None, 5000),
])
def test_horizon(held: int, oldest: int | None, expected: int) -> None:
    limits = Limits(retention_ms=5000, max_posts=10)
    assert horizon_ms(10_000, limits, held, oldest) == expected


def test_digest_diff_lists_only_buckets_that_may_hold_missing_posts() -> None:
    width = 1000
    shared = [post(100).post_id, post(1500).post_id]
    mine = make_buckets([*shared, post(2500).post_id], width)
    theirs = make_buckets([*shared, post(1600).post_id, post(3500).post_id], width)
    # 0: same; 1000: they have one more; 2000: only mine (not pulled); 3000: only theirs.
    assert differing_buckets(mine, list(theirs.values())) == (1000, 3000)
    assert differing_buckets(mine, list(mine.values())) == ()


@pytest.mark.parametrize(("mine", "theirs", "horizon", "expected"), [
    ({1, 2}, [1, 2, 3], 0, [3]),
    ({1}, [3, 2, 2], 0, [2, 3]),           # duplicates in the listing, sorted result
    (set(), [1, 5, 9], 5, [5, 9]),         # older than our horizon: not fetched
    ({1, 2}, [1, 2], 0, []),
])
def test_missing_ids(mine: set[int], theirs: list[int], horizon: int, expected: list[int]) -> None:
    ids = {ms: post(ms).post_id for ms in {*mine, *theirs}}
    got = missing_ids({ids[m] for m in mine}, [ids[t] for t in theirs], horizon)
    assert [ulid_time_ms(i) for i in got] == expected


def test_buckets_summarise_count_and_ids() -> None:
    a = make_buckets([post(1, n=1).post_id, post(2, n=2).post_id], 1000)
    b = make_buckets([post(2, n=2).post_id, post(1, n=1).post_id], 1000)
    c = make_buckets([post(1, n=1).post_id, post(3, n=3).post_id], 1000)
    assert a == b and a[0].count == 2
    assert a[0].hash != c[0].hash


@pytest.mark.parametrize(("query", "texts", "expected"), [
    ("gossip", ["gossip gossip", "a gossiping node", "nothing"], ["gossip gossip",
                                                                   "a gossiping node"]),
    ("etcd lease", ["lease", "etcd lease", "etcd"], ["etcd lease", "etcd", "lease"]),
    ("GPU", ["gpu busy", "GPU idle"], ["GPU idle", "gpu busy"]),  # tie: newest first
])
def test_search_ranking(query: str, texts: list[str], expected: list[str]) -> None:
    posts = [post(1000 + i, t) for i, t in enumerate(texts)]
    assert [h.post.text for h in rank(posts, query_words(query), 10)] == expected


def test_query_words() -> None:
    assert query_words("Etcd, lease; etcd!") == ("etcd", "lease")


def test_ids_are_time_ordered_and_monotonic() -> None:
    gen = IdGenerator(random.Random(1).getrandbits)
    made = [gen.next(ms) for ms in (5, 5, 5, 4, 9)]   # the clock steps back at 4
    ids = [i for i, _ in made]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [t for _, t in made] == [5, 5, 5, 5, 9]
    assert all(is_post_id(i) and ulid_time_ms(i) == t for i, t in made)


@pytest.mark.parametrize(("desired", "added", "removed"), [
    ([Peer(NodeId("b"), "h:1"), Peer(NodeId("c"), "h:2")], ["c"], []),
    ([], [], ["b"]),
    ([Peer(NodeId("b"), "h:9")], ["b"], ["b"]),       # restarted on another port
    ([Peer(NodeId("me"), "h:0"), Peer(NodeId("b"), "h:1")], [], []),  # never ourselves
])
def test_peer_changes(desired: list[Peer], added: list[str], removed: list[str]) -> None:
    current = {NodeId("b"): Peer(NodeId("b"), "h:1")}
    got_added, got_removed = peer_changes(current, desired, NodeId("me"))
    assert ([p.node_id for p in got_added], got_removed) == (added, removed)


def test_choose_peers_never_more_than_there_are() -> None:
    ids = [NodeId(x) for x in "abc"]
    assert len(choose_peers(ids, 2, random.Random(0))) == 2
    assert sorted(choose_peers(ids, 5, random.Random(0))) == ids


@pytest.mark.parametrize(("text", "expected"), [
    ("", 0),
    ("1767225600", 1_767_225_600_000),
    ("1767225600.5", 1_767_225_600_500),
    ("2026-01-01T00:00:00Z", 1_767_225_600_000),
    ("2026-01-01T01:00:00+01:00", 1_767_225_600_000),
    ("15m", 10_000_000 - 15 * MIN),
    ("2h", 10_000_000 - 120 * MIN),
])
def test_parse_since(text: str, expected: int) -> None:
    assert parse_since(text, 10_000_000) == expected


def test_parse_since_names_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_since("yesterday", 0)


def test_bucket_equality_is_by_value() -> None:
    assert Bucket(0, 1, b"x") == Bucket(0, 1, b"x")


@pytest.mark.parametrize(("argv", "env", "key"), [
    (["--max-text-bytes", "lots"], {}, "--max-text-bytes / MESHLLM_BLACKBOARD_MAX_TEXT_BYTES"),
    ([], {"MESHLLM_BLACKBOARD_RETENTION_H": "-1"}, "MESHLLM_BLACKBOARD_RETENTION_H"),
    (["--listen", "nowhere"], {}, "--listen"),
    (["--on-secret", "ignore"], {}, "--on-secret"),
    (["--max-text-bytes", "1MiB"], {}, "--max-text-bytes"),
])
def test_config_errors_name_the_key(argv: list[str], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(argv, env)


def test_config_defaults() -> None:
    config = load_config([], {})
    assert (config.listen, config.max_text_bytes, config.posts_per_author_per_minute,
            config.retention_h) == ("0.0.0.0:9339", 4096, 10, 48.0)
    assert config.advertise_for(9339) == "127.0.0.1:9339"
