"""Search by meaning: the vectors one node holds, cosine ranking, the hybrid blend, and
which mode a search runs in. Pure apart from the in-memory matrix.

Cosine: between the query's vector and each post's, both normalised (workers send unit
vectors already). Centring the vectors on the board's mean was tried and dropped: on the
test set of tests/blackboard/test_meaning_mesh.py it lowered recall@1 from 1.0 to 0.8.

Hybrid blend, per candidate (the `limit` nearest by cosine plus every post containing a
query word: no other post can rank above them, having no word hit and a lower cosine):
    score = (1 - WORD_WEIGHT) * c + WORD_WEIGHT * h / (h + 1)
where c is the cosine rescaled to [0, 1] over the candidates (best 1, worst 0; 0 for a
post without a vector) and h the word hits. Word hits saturate (1 hit 0.5, 3 hits 0.75),
so repeating a word does not outrank meaning, while a word hit still lifts a post among
those of about equal meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from meshllm.blackboard.ranking import count_hits
from meshllm.common.blackboard.types import Post, PostId, SearchHit, SearchMode

WORD_WEIGHT = 0.3
Matrix = npt.NDArray[np.float32]


def to_blob(vector: Sequence[float]) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes) -> Matrix:
    return np.frombuffer(blob, dtype="<f4")


def _normalised(rows: Matrix) -> Matrix:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    unit: Matrix = (rows / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


class VectorIndex:
    """One model's post vectors, as a matrix built when searched after a change."""

    def __init__(self, model: str, vectors: Sequence[tuple[PostId, bytes]] = ()) -> None:
        self.model = model
        self._pending: list[tuple[PostId, bytes]] = [v for v in vectors if v[1]]
        self._ids: list[PostId] = []
        self._rows: dict[PostId, int] = {}
        self._unit: Matrix = np.zeros((0, 0), np.float32)  # one unit row per id

    def __len__(self) -> int:
        return len(self._ids) + len(self._pending)

    def add(self, vectors: Sequence[tuple[PostId, bytes]]) -> None:
        """Empty vectors (posts no worker would embed) are left out."""
        self._pending += [v for v in vectors if v[1]]

    def _build(self) -> None:
        if not self._pending:
            return
        width = len(from_blob(self._pending[0][1]))
        fresh = [(i, from_blob(b)) for i, b in self._pending if len(b) == width * 4]
        self._pending = []
        if self._ids and self._unit.shape[1] != width:  # another width: start over
            self._ids, self._unit = [], np.zeros((0, width), np.float32)
        held = self._unit.reshape(len(self._ids), width)
        rows = np.stack([v for _, v in fresh]) if fresh else np.zeros((0, width), np.float32)
        self._unit = np.vstack([held, _normalised(rows)])
        self._ids += [i for i, _ in fresh]
        self._rows = {post_id: row for row, post_id in enumerate(self._ids)}

    def keep(self, held: set[PostId]) -> None:
        """Drop the vectors of posts no longer held (expired)."""
        self._build()
        rows = [row for row, post_id in enumerate(self._ids) if post_id in held]
        if len(rows) < len(self._ids):
            self._unit = self._unit[rows]
            self._ids = [self._ids[row] for row in rows]
            self._rows = {post_id: row for row, post_id in enumerate(self._ids)}

    def nearest(self, query: Sequence[float], k: int, also: Iterable[PostId] = ()
                ) -> dict[PostId, float]:
        """Cosines to the query of the k nearest posts, and of the `also` posts that hold
        a vector."""
        self._build()
        if not self._ids or len(query) != self._unit.shape[1]:
            return {}
        q = _normalised(np.asarray(query, np.float32))
        # einsum, not `@`: a matrix-vector product gains nothing from BLAS threads, which
        # on a busy host wait for cores (p95 of 10,000 posts: 70 ms with `@`, 5 without).
        scores = np.einsum("ij,j->i", self._unit, q)
        k = min(k, len(scores))
        picked = {self._ids[i]: float(scores[i]) for i in np.argpartition(-scores, k - 1)[:k]}
        for post_id in also:
            if (row := self._rows.get(post_id)) is not None:
                picked[post_id] = float(scores[row])
        return picked


def top_semantic(cosines: dict[PostId, float], limit: int) -> list[tuple[PostId, float]]:
    ranked = sorted(cosines.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return ranked[:limit]


def word_score(hits: int) -> float:
    return hits / (hits + 1)


def blend(cosine01: float, hits: int) -> float:
    return (1 - WORD_WEIGHT) * cosine01 + WORD_WEIGHT * word_score(hits)


def semantic_hits(posts: Sequence[Post], cosines: dict[PostId, float],
                  words: tuple[str, ...], limit: int) -> list[SearchHit]:
    hits = [SearchHit(p, count_hits(p, words), cosines[p.post_id]) for p in posts
            if p.post_id in cosines]
    hits.sort(key=lambda h: (h.score, h.post.created_unix_ms, h.post.post_id), reverse=True)
    return hits[:limit]


def hybrid_hits(posts: Sequence[Post], cosines: dict[PostId, float],
                words: tuple[str, ...], limit: int) -> list[SearchHit]:
    """Candidates ranked by the blend (module docstring); each post once."""
    unique = list({p.post_id: p for p in posts}.values())
    known = [cosines[p.post_id] for p in unique if p.post_id in cosines]
    low, high = (min(known), max(known)) if known else (0.0, 0.0)
    span = high - low or 1.0

    def scaled(post: Post) -> float:
        return (cosines[post.post_id] - low) / span if post.post_id in cosines else 0.0

    scored = [SearchHit(p, n, blend(scaled(p), n)) for p in unique
              if (n := count_hits(p, words)) or p.post_id in cosines]
    scored.sort(key=lambda h: (h.score, h.post.created_unix_ms, h.post.post_id), reverse=True)
    return scored[:limit]


@dataclass(frozen=True)
class MeaningState:
    """What a node can do for search by meaning right now."""

    enabled: bool = True   # False: --embed-model off
    model: str = ""        # the embeddings model in use; "" = none on the mesh now
    vectors: int = 0       # posts holding a vector of that model


def choose_mode(asked: SearchMode, state: MeaningState) -> tuple[SearchMode, str]:
    """The mode a search runs in, and a note when it is not the one asked for."""
    if asked is SearchMode.WORDS:
        return SearchMode.WORDS, ""
    if not state.enabled:
        return SearchMode.WORDS, "embeddings are off on this node (--embed-model off): " \
                                 "ranked by words"
    if not state.model:
        return SearchMode.WORDS, "no worker on the mesh serves an embeddings model: " \
                                 "ranked by words"
    if state.vectors == 0:
        return SearchMode.WORDS, f"no post has a vector of {state.model} yet: ranked by words"
    return (SearchMode.HYBRID if asked is SearchMode.AUTO else asked), ""
