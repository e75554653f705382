"""Search on one node: by words (`ranking`), by meaning or a blend of both (`meaning`).

The mode is chosen by `meaning.choose_mode`; when the query cannot be embedded the search
runs by words and the reply's note says why, so a search never fails for want of a model.
"""

from __future__ import annotations

import logging

from meshllm.blackboard import meaning
from meshllm.blackboard.board import Board
from meshllm.blackboard.embedder import EMBED_CHARS, Embedder
from meshllm.blackboard.ranking import query_words
from meshllm.common.blackboard.errors import EmbeddingUnavailable, PostRejected
from meshllm.common.blackboard.types import SearchMode, SearchResult

log = logging.getLogger(__name__)


class Searcher:
    def __init__(self, board: Board, embedder: Embedder | None = None) -> None:
        self._board = board
        self._embedder = embedder

    def state(self) -> meaning.MeaningState:
        if self._embedder is None:
            return meaning.MeaningState(enabled=False)
        return self._embedder.state()

    async def search(self, query: str, limit: int, mode: SearchMode) -> SearchResult:
        if not query.strip():
            raise PostRejected("the search query has no words")
        used, note = meaning.choose_mode(mode, self.state())
        if used is not SearchMode.WORDS and self._embedder is not None:
            try:
                return await self._by_meaning(self._embedder, query, limit, used)
            except EmbeddingUnavailable as exc:
                used, note = SearchMode.WORDS, f"embedding the query failed ({exc}): " \
                                               "ranked by words"
        return SearchResult(tuple(self._board.search(query, limit)), SearchMode.WORDS, note)

    async def _by_meaning(self, embedder: Embedder, query: str, limit: int,
                          mode: SearchMode) -> SearchResult:
        model = embedder.model()
        if model is None:
            raise EmbeddingUnavailable("the embeddings model went away")
        [vector] = await embedder.embed(model, [query[:EMBED_CHARS]],
                                        embedder.settings.query_timeout_s)
        index, words = embedder.index(model), query_words(query)
        if mode is SearchMode.SEMANTIC:
            cosines = index.nearest(vector, limit)
            hits = meaning.semantic_hits(self._board.fetch(list(cosines)), cosines, words,
                                         limit)
        else:
            by_words = self._board.word_candidates(words)
            held = {p.post_id for p in by_words}
            cosines = index.nearest(vector, limit, held)
            posts = self._board.fetch([i for i in cosines if i not in held]) + by_words
            hits = meaning.hybrid_hits(posts, cosines, words, limit)
        return SearchResult(tuple(hits), mode)
