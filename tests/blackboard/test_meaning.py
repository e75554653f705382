"""Search by meaning without processes: cosine ranking, the hybrid blend, the mode choice
and its fallback note, the model choice, vectors in SQLite and the schema migration."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from meshllm.blackboard import meaning
from meshllm.blackboard.board import Board, BoardSettings
from meshllm.blackboard.embedder import Embedder, EmbedSettings, embedding_model, text_of
from meshllm.blackboard.hub import Hub
from meshllm.blackboard.ids import encode_ulid
from meshllm.blackboard.meaning import MeaningState, VectorIndex, choose_mode, to_blob
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.rules import Limits
from meshllm.blackboard.search import Searcher
from meshllm.blackboard.storage import PostStore
from meshllm.common.blackboard import wire
from meshllm.common.blackboard.errors import EmbeddingRefused
from meshllm.common.blackboard.types import (
    NodeId,
    Post,
    PostId,
    SearchHit,
    SearchMode,
    SearchResult,
)
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.tls import PLAINTEXT
from meshllm.common.types import (
    LoadState,
    ModelId,
    ModelSpec,
    ModelState,
    Placement,
    WorkerId,
    WorkerInfo,
    whole,
)

NOW = 1_800_000_000_000
AUTO, WORDS, SEMANTIC, HYBRID = (SearchMode.AUTO, SearchMode.WORDS, SearchMode.SEMANTIC,
                                 SearchMode.HYBRID)


def make(i: int, text: str = "") -> Post:
    return Post(encode_ulid(NOW + i, 1), "a", NodeId("n"), NOW + i, text or f"text {i}")


def unit(*xs: float) -> tuple[float, ...]:
    norm = math.sqrt(sum(x * x for x in xs))
    return tuple(x / norm for x in xs)


def test_cosine_ranks_nearest_first() -> None:
    posts = [make(i) for i in range(3)]
    vectors = [unit(1, 0, 0), unit(0.6, 0.8, 0), unit(0, 0, 1)]
    index = VectorIndex("m", [(p.post_id, to_blob(v)) for p, v in zip(posts, vectors, strict=True)])
    cosines = index.nearest(unit(1, 0.1, 0), 3)
    assert [i for i, _ in meaning.top_semantic(cosines, 2)] == [posts[0].post_id,
                                                                posts[1].post_id]
    assert cosines[posts[0].post_id] == pytest.approx(0.995, abs=1e-3)
    hits = meaning.semantic_hits(posts, cosines, ("text",), 3)
    assert [h.post for h in hits] == posts[:2] + posts[2:] and hits[0].hits == 1


def test_an_index_grows_and_ignores_a_query_of_another_width() -> None:
    index = VectorIndex("m")
    assert len(index) == 0 and index.nearest(unit(1, 0), 5) == {}
    index.add([(PostId("p"), to_blob(unit(1, 0)))])
    assert len(index) == 1 and index.nearest(unit(1, 0, 0), 5) == {}
    assert index.nearest(unit(1, 0), 5) == {PostId("p"): pytest.approx(1.0)}
    index.add([(PostId(f"q{i}"), to_blob(unit(0, 1))) for i in range(3)])
    assert index.nearest(unit(1, 0), 1, also=[PostId("q1"), PostId("absent")]) == {
        PostId("p"): pytest.approx(1.0), PostId("q1"): pytest.approx(0.0, abs=1e-6)}
    index.keep({PostId("q0"), PostId("q2")})
    assert len(index) == 2 and set(index.nearest(unit(1, 0), 5)) == {PostId("q0"), PostId("q2")}
    index.add([(PostId("wide"), to_blob(unit(1, 0, 0)))])  # another model width: starts over
    assert set(index.nearest(unit(1, 0, 0), 5)) == {PostId("wide")}


@pytest.mark.parametrize(("cosine01", "hits", "score"), [
    (1.0, 0, 0.7), (0.0, 1, 0.15), (0.0, 3, 0.225), (0.5, 1, 0.5), (0.0, 0, 0.0),
    (1.0, 1, 0.85),
])
def test_blend(cosine01: float, hits: int, score: float) -> None:
    assert meaning.blend(cosine01, hits) == pytest.approx(score)


def test_hybrid_puts_meaning_above_a_single_word_and_words_break_ties() -> None:
    near, far_with_word, near_with_word, no_vector, far = (
        make(1, "alpha"), make(2, "beta query"), make(3, "gamma query"), make(4, "query"),
        make(5, "delta"))
    cosines = {near.post_id: 0.9, far_with_word.post_id: 0.5, near_with_word.post_id: 0.9,
               far.post_id: 0.1}
    hits = meaning.hybrid_hits([near, far_with_word, near_with_word, no_vector, near, far],
                               cosines, ("query",), 10)
    assert [h.post for h in hits] == [near_with_word, near, far_with_word, no_vector, far]
    assert [h.score for h in hits] == pytest.approx([0.85, 0.7, 0.5, 0.15, 0.0])


@pytest.mark.parametrize(("asked", "state", "used", "note"), [
    (AUTO, MeaningState(True, "m", 5), HYBRID, ""),
    (SEMANTIC, MeaningState(True, "m", 5), SEMANTIC, ""),
    (HYBRID, MeaningState(True, "m", 5), HYBRID, ""),
    (WORDS, MeaningState(True, "m", 5), WORDS, ""),
    (AUTO, MeaningState(False), WORDS, "embeddings are off"),
    (SEMANTIC, MeaningState(True, "", 0), WORDS, "no worker on the mesh serves"),
    (HYBRID, MeaningState(True, "m", 0), WORDS, "no post has a vector of m yet"),
    (WORDS, MeaningState(False), WORDS, ""),
], ids=["auto is hybrid", "semantic", "hybrid", "words", "off", "no model", "no vectors",
        "words asked: no note"])
def test_choose_mode(asked: SearchMode, state: MeaningState, used: SearchMode,
                     note: str) -> None:
    got_used, got_note = choose_mode(asked, state)
    assert got_used is used and note in got_note and bool(got_note) == bool(note)


M = ModelId("emb")


def mesh(state: LoadState = LoadState.READY, placed: bool = True) -> MeshSnapshot:
    models = (M, ModelId("zz"))
    worker = WorkerInfo(WorkerId("w"), "127.0.0.1:1", "cpu", 1, 1, 0.0,
                        tuple(ModelState(m, state) for m in models))
    specs = {m: ModelSpec(m, str(m), 1, 1, 1, 1, "x", 1) for m in models}
    placements = {m: Placement(m, (whole(WorkerId("w"), 1),), 1) for m in specs} if placed else {}
    return MeshSnapshot({worker.worker_id: worker}, specs, placements)


@pytest.mark.parametrize(("snapshot", "wanted", "model"), [
    (mesh(), "", M), (mesh(), "zz", ModelId("zz")), (mesh(), "off", None),
    (mesh(), "other", None), (mesh(LoadState.LOADING), "", None), (mesh(placed=False), "", None),
    (MeshSnapshot(), "", None),
], ids=["first by id", "configured", "off", "absent", "loading", "not placed", "empty mesh"])
def test_embedding_model(snapshot: MeshSnapshot, wanted: str, model: ModelId | None) -> None:
    assert embedding_model(snapshot, wanted) == model


def test_text_of_a_post_has_its_tags_and_is_bounded() -> None:
    post = Post(PostId("p"), "a", NodeId("n"), NOW, "x" * 5000, ("gossip",))
    assert len(text_of(post)) == 2000
    assert text_of(Post(PostId("p"), "a", NodeId("n"), NOW, "hi", ("t1", "t2"))) == "hi t1 t2"


def board_on(tmp_path: Path) -> tuple[Board, PostStore]:
    store = PostStore(tmp_path, NodeId("n"))
    settings = BoardSettings(NodeId("n"), Limits(4096, 100, 3_600_000, 1000))
    return Board(settings, store, Hub(), Metrics(), clock_ms=lambda: NOW + 10), store


def test_vectors_persist_skip_expired_posts_and_go_with_their_post(tmp_path: Path) -> None:
    store = PostStore(tmp_path, NodeId("n"))
    posts = [make(i) for i in range(3)]
    store.insert(posts)
    assert store.unembedded("m", 10) == posts[::-1]  # newest first
    stored = store.put_vectors("m", [(posts[0].post_id, to_blob(unit(1, 0))),
                                     (PostId("gone"), to_blob(unit(0, 1)))])
    assert stored == 1 and store.unembedded("m", 10) == posts[:0:-1]
    assert store.unembedded("other-model", 10) == posts[::-1]
    store.close()
    reopened = PostStore(tmp_path, NodeId("n"))
    assert reopened.vectors("m") == [(posts[0].post_id, to_blob(unit(1, 0)))]
    reopened.prune(NOW + 1, 1000)
    assert reopened.vectors("m") == []


def test_a_schema_1_database_gains_the_vector_table(tmp_path: Path) -> None:
    """A data directory written before search by meaning opens, keeps its posts, and
    lists them as waiting for a vector."""
    db = sqlite3.connect(tmp_path / "blackboard.sqlite3")
    db.executescript("""
      CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
      CREATE TABLE posts (post_id TEXT PRIMARY KEY, author TEXT NOT NULL,
        origin_node TEXT NOT NULL, created_unix_ms INTEGER NOT NULL, text TEXT NOT NULL,
        tags TEXT NOT NULL, channel TEXT NOT NULL, reply_to TEXT NOT NULL);
      CREATE TABLE post_tags (tag TEXT NOT NULL, post_id TEXT NOT NULL, PRIMARY KEY (tag, post_id));
      INSERT INTO meta VALUES ('node_id', 'n');
    """)
    old = make(1, "written by schema 1")
    db.execute("INSERT INTO posts VALUES (?, 'a', 'n', ?, ?, '[]', '', '')",
               (old.post_id, old.created_unix_ms, old.text))
    db.commit()
    db.close()
    store = PostStore(tmp_path, NodeId("n"))
    assert store.unembedded("m", 10) == [old]
    assert store.put_vectors("m", [(old.post_id, to_blob(unit(1, 0)))]) == 1
    version = store._db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
    assert version.fetchone()[0] == "2"


async def test_without_embeddings_search_says_it_used_words(tmp_path: Path) -> None:
    board, store = board_on(tmp_path)
    store.insert([make(1, "the gossip protocol")])
    off = await Searcher(board).search("gossip", 5, SEMANTIC)
    assert off.mode_used is WORDS and "embeddings are off" in off.note
    assert [h.hits for h in off.hits] == [1]
    embedder = Embedder(EmbedSettings(""), store, Metrics(), PLAINTEXT)
    none = await Searcher(board, embedder).search("gossip", 5, AUTO)
    assert none.mode_used is WORDS and "no worker on the mesh serves" in none.note
    words = await Searcher(board, embedder).search("gossip", 5, WORDS)
    assert (words.mode_used, words.note) == (WORDS, "")


async def test_a_worker_that_does_not_answer_falls_back_to_words(tmp_path: Path) -> None:
    board, store = board_on(tmp_path)
    post = make(1, "the gossip protocol")
    store.insert([post])
    store.put_vectors(str(M), [(post.post_id, to_blob(unit(1, 0)))])
    embedder = Embedder(EmbedSettings("", query_timeout_s=0.5), store, Metrics(), PLAINTEXT)
    embedder.set_snapshot(mesh())  # the worker's address 127.0.0.1:1 refuses connections
    result = await Searcher(board, embedder).search("gossip", 5, AUTO)
    assert result.mode_used is WORDS and "embedding the query failed" in result.note
    assert [h.post for h in result.hits] == [post]
    await embedder.close()


def test_the_search_reply_round_trips_through_the_wire() -> None:
    result = SearchResult((SearchHit(make(1), 2, 0.5),), HYBRID, "")
    assert wire.search_result_from_pb(wire.search_result_to_pb(result)) == result
    for mode in SearchMode:
        assert wire.mode_from_pb(wire.mode_to_pb(mode)) is mode
        assert wire.parse_mode(mode.value) is mode
    assert wire.mode_from_pb(99) is AUTO and wire.parse_mode("") is AUTO
    with pytest.raises(ValueError, match="semantic"):
        wire.parse_mode("fuzzy")
    assert wire.search_result_to_json(result)["mode_used"] == "hybrid"


class PickyEmbedder(Embedder):
    """A worker stand-in that refuses texts over `max_chars`, and any text saying 'never'."""

    def __init__(self, store: PostStore, max_chars: int) -> None:
        super().__init__(EmbedSettings(""), store, Metrics(), PLAINTEXT)
        self.max_chars = max_chars
        self.calls: list[int] = []

    async def embed(self, model: ModelId, texts: Sequence[str], timeout_s: float
                    ) -> list[tuple[float, ...]]:
        self.calls.append(len(texts))
        if any(len(t) > self.max_chars or t.startswith("never") for t in texts):
            raise EmbeddingRefused("input too long")
        return [unit(1, float(len(t))) for t in texts]


async def test_a_refused_batch_is_embedded_post_by_post_and_shorter(tmp_path: Path) -> None:
    """One post a worker will not embed (too many tokens) must not hold up the others,
    nor be retried forever: it is cut shorter, and at worst left to word search."""
    store = PostStore(tmp_path, NodeId("n"))
    short, long, never = make(1, "short"), make(2, "x" * 1500), make(3, "never " * 10)
    store.insert([short, long, never])
    embedder = PickyEmbedder(store, max_chars=1200)
    embedder.set_snapshot(mesh())
    task = asyncio.create_task(embedder.run())
    for _ in range(100):
        if not store.unembedded(str(M), 10):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert store.unembedded(str(M), 10) == []
    vectors = dict(store.vectors(str(M)))
    assert vectors[never.post_id] == b"" and len(vectors[long.post_id]) == 8
    assert len(embedder.index(str(M))) == 2  # the empty vector is not searched
    assert embedder.calls == [3, 1, 1, 1, 1, 1, 1]  # batch; short; long 2000, 1000; never x3
