"""Blackboard search latency: words vs semantic vs hybrid, for 1,000 and 10,000 posts.

In one process, through the node's real code: posts stored by `PostStore`, vectors stored
through `PostStore.put_vectors` and searched by `Searcher` with the node's `VectorIndex`.
The vectors are synthetic: random unit vectors of gemma3-270m's width (640), and the query
vector is one too, returned at once by a stand-in for the worker, so the numbers are the
node's own cost. Embedding the query on a real worker comes on top (gemma3-270m on CPU, 1
thread: 120-230 ms, see tests/blackboard/test_meaning_mesh.py). The first search after a
change (re)builds the index from SQLite; that is reported apart ("index build").

    .venv/bin/python bench/blackboard_search.py [--sizes 1000,10000] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshllm.blackboard.board import Board, BoardSettings
from meshllm.blackboard.embedder import Embedder, EmbedSettings
from meshllm.blackboard.hub import Hub
from meshllm.blackboard.ids import encode_ulid
from meshllm.blackboard.meaning import to_blob
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.rules import Limits
from meshllm.blackboard.search import Searcher
from meshllm.blackboard.storage import PostStore
from meshllm.common.blackboard.types import NodeId, Post, SearchMode
from meshllm.common.tls import PLAINTEXT
from meshllm.common.types import ModelId

WIDTH = 640
MODEL = ModelId("gemma3-270m")
NOW = 1_800_000_000_000
VOCABULARY = [f"w{i}" for i in range(2000)]


class SyntheticEmbedder(Embedder):
    """The node's embedder with the worker replaced: a random unit vector at once."""

    def __init__(self, store: PostStore, rng: np.random.Generator) -> None:
        super().__init__(EmbedSettings(""), store, Metrics(), PLAINTEXT)
        self._rng = rng

    def model(self) -> ModelId | None:
        return MODEL

    async def embed(self, model: ModelId, texts: Sequence[str], timeout_s: float
                    ) -> list[tuple[float, ...]]:
        return [tuple(unit_vectors(self._rng, 1)[0].tolist()) for _ in texts]


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, WIDTH)).astype(np.float32)
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def fill(store: PostStore, n: int, rng: np.random.Generator) -> None:
    words = random.Random(1)
    posts = [Post(encode_ulid(NOW + i, i), f"a{i % 50}", NodeId("n"), NOW + i,
                  " ".join(words.choices(VOCABULARY, k=20))) for i in range(n)]
    store.insert(posts)
    vectors = unit_vectors(rng, n)
    store.put_vectors(MODEL, [(p.post_id, to_blob(v)) for p, v in zip(posts, vectors,
                                                                       strict=True)])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(n: int, queries: int) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = PostStore(Path(tmp), NodeId("n"))
        fill(store, n, rng)
        board = Board(BoardSettings(NodeId("n"), Limits(4096, 10, 10 ** 12, 10 ** 6)),
                      store, Hub(), Metrics(), clock_ms=lambda: NOW + n)
        embedder = SyntheticEmbedder(store, rng)
        searcher = Searcher(board, embedder)
        started = time.perf_counter()
        embedder.index(MODEL).nearest(unit_vectors(rng, 1)[0].tolist(), 20)
        results = {"index build": ((time.perf_counter() - started) * 1000,) * 2}
        words = random.Random(2)
        for mode in (SearchMode.WORDS, SearchMode.SEMANTIC, SearchMode.HYBRID):
            times = []
            for _ in range(queries):
                query = " ".join(words.choices(VOCABULARY, k=2))
                started = time.perf_counter()
                result = await searcher.search(query, 20, mode)
                times.append((time.perf_counter() - started) * 1000)
                assert result.mode_used is mode, result.note
            results[mode.value] = (statistics.median(times), percentile(times, 0.95))
        store.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    print(f"{'posts':>7} {'mode':<12} {'p50 ms':>8} {'p95 ms':>8}")
    for n in (int(s) for s in args.sizes.split(",")):
        for mode, (p50, p95) in (await measure(n, args.queries)).items():
            print(f"{n:>7} {mode:<12} {p50:>8.2f} {p95:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
