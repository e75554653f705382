"""The SQLite store and the board's rules on it, without processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshllm.blackboard.board import Board, BoardSettings
from meshllm.blackboard.hub import Hub
from meshllm.blackboard.ids import encode_ulid
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.rules import Limits
from meshllm.blackboard.storage import PostStore
from meshllm.common.blackboard.types import Draft, FeedQuery, NodeId, Post
from meshllm.common.errors import ConfigError

NOW = 1_800_000_000_000


def make(ms: int, author: str = "a", tags: tuple[str, ...] = ()) -> Post:
    return Post(encode_ulid(ms, 1), author, NodeId("n"), ms, f"text {ms}", tags)


def test_insert_is_idempotent_and_survives_reopening(tmp_path: Path) -> None:
    store = PostStore(tmp_path, NodeId("n"))
    posts = [make(NOW + i, tags=("t",) if i % 2 else ()) for i in range(4)]
    new, dups = store.insert(posts)
    assert (len(new), dups) == (4, 0)
    new, dups = store.insert(posts[:2])
    assert (new, dups) == ([], 2)
    store.close()
    reopened = PostStore(tmp_path, NodeId("n"))
    assert reopened.feed(FeedQuery()) == posts[::-1]
    assert reopened.feed(FeedQuery(tag="t")) == [posts[3], posts[1]]
    assert reopened.feed(FeedQuery(since_unix_ms=NOW + 2, limit=1)) == [posts[3]]


def test_a_data_dir_belongs_to_one_node(tmp_path: Path) -> None:
    PostStore(tmp_path, NodeId("n")).close()
    with pytest.raises(ConfigError, match="belongs to node 'n'"):
        PostStore(tmp_path, NodeId("other"))


@pytest.mark.parametrize(("cutoff", "max_posts", "left"), [
    (0, 10, [4, 3, 2, 1, 0]),
    (NOW + 2, 10, [4, 3, 2]),      # retention
    (0, 2, [4, 3]),                # count: the oldest go first
    (NOW + 1, 3, [4, 3, 2]),
])
def test_prune(tmp_path: Path, cutoff: int, max_posts: int, left: list[int]) -> None:
    store = PostStore(tmp_path, NodeId("n"))
    store.insert([make(NOW + i, tags=("x",)) for i in range(5)])
    store.prune(cutoff, max_posts)
    assert [p.created_unix_ms - NOW for p in store.feed(FeedQuery())] == left
    assert store.feed(FeedQuery(tag="x")) == store.feed(FeedQuery())  # tags went with them


def test_board_refuses_peer_posts_it_would_expire_at_once(tmp_path: Path) -> None:
    limits = Limits(retention_ms=1000, max_posts=2)
    board = Board(BoardSettings(NodeId("n"), limits), PostStore(tmp_path, NodeId("n")),
                  Hub(), Metrics(), clock_ms=lambda: NOW)
    result = board.ingest([make(NOW - 5000), make(NOW - 10), make(NOW - 5)])
    assert (len(result.stored), result.rejected) == (2, 1)
    # Full now: older than the oldest held is not taken either.
    assert board.ingest([make(NOW - 20)]).rejected == 1
    assert board.post(Draft("me", "fresh")).post.created_unix_ms == NOW
    board.prune()
    assert board.count() == 2
