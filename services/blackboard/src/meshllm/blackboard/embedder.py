"""Embedding posts with the mesh's embeddings model, in the background.

Every node embeds the posts it holds, whether made here or learnt from a peer; vectors
are never gossiped. Measured with real processes (tests/blackboard/test_meaning_mesh.py,
`-s`: two nodes, one worker running gemma3-270m on CPU, 1 thread): an Embed call costs
60-100 ms of worker time per post in batches of 32, 120-230 ms alone; a post reaches the
other node in ~10 ms and is searchable by meaning there ~230 ms after it was made. The
alternative, measured by its parts: the origin has embedded it after ~125 ms, and a push
carrying the vector (2,563 bytes for 640 floats; the post itself is ~80) takes ~8 ms, so
~133 ms, with one Embed call per post instead of one per node: cheaper, and faster here
because both nodes' calls queue on the one worker. Every node embeds all the same,
because gossiped vectors need a wire change (vectors in Gossip and Fetch, a second push:
a post never waits for its vector) and digests over vectors for anti-entropy to repair
lost ones; they cannot be checked by the receiver (a hostile peer could rank its posts
first), nor compared when nodes run different --embed-model; and a blackboard's post
rate is low (10 per author per minute), so N calls of ~100 ms per post is little worker
time. Revisit when a mesh runs many blackboard nodes on few CPU-only workers.

A post is stored first and embedded afterwards: embedding never delays or refuses a post.
While no worker answers, the loop backs off (EMBED_BACKOFF_S up to EMBED_BACKOFF_MAX_S);
posts without a vector (new, from before embeddings existed, from before a restart) are
embedded newest first, EMBED_BATCH per call. A worker embeds a bounded number of tokens
per input (512 for gemma3-270m): a batch it refuses is embedded post by post, each cut
to CHAR_BUDGETS in turn; a post refused even at the shortest gets an empty vector, so it
is never retried and is found by words only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from meshllm.blackboard.meaning import MeaningState, VectorIndex, to_blob
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.storage import PostStore
from meshllm.common import convert, grpc_errors
from meshllm.common.blackboard.errors import EmbeddingRefused, EmbeddingUnavailable
from meshllm.common.blackboard.types import Post
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.meshview import MeshSnapshot
from meshllm.common.replicas import ready_replicas, serves_embeddings
from meshllm.common.tls import GrpcSecurity
from meshllm.common.types import EmbedRequest, ModelId, RequestId, WorkerInfo
from meshllm.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)

OFF = "off"
EMBED_BATCH = 32              # posts per Embed call
EMBED_CHARS = 2000            # a post's first characters embedded, at most
CHAR_BUDGETS = (EMBED_CHARS, 1000, 400)  # tried in turn for a post a worker refuses
EMBED_BACKOFF_S = 0.5         # first wait after a failed batch; doubles per failure
EMBED_BACKOFF_MAX_S = 30.0
BACKFILL_PAUSE_S = 0.05       # between batches, so a backlog does not monopolise workers


@dataclass(frozen=True)
class EmbedSettings:
    model: str                  # "" = the first model (by id) that embeds; "off" = never
    call_timeout_s: float = 30.0  # one Embed call of a batch of posts
    query_timeout_s: float = 5.0  # embedding a search query


def embedding_model(snapshot: MeshSnapshot, wanted: str) -> ModelId | None:
    """The model to embed with: `wanted` when a whole replica of it is ready, else (for
    wanted "") the first model by id that has one; None when there is none."""
    if wanted == OFF:
        return None
    names = [ModelId(wanted)] if wanted else sorted(snapshot.placements)
    for model in names:
        if serves_embeddings(snapshot, model) and ready_replicas(snapshot, model, True):
            return model
    return None


def text_of(post: Post, chars: int = EMBED_CHARS) -> str:
    return " ".join((post.text, *post.tags))[:chars]


class Embedder:
    def __init__(self, settings: EmbedSettings, store: PostStore, metrics: Metrics,
                 security: GrpcSecurity) -> None:
        self.settings = settings
        self._store = store
        self._metrics = metrics
        self._security = security
        self._snapshot = MeshSnapshot()
        self._wake = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._index: VectorIndex | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.model != OFF

    def set_snapshot(self, snapshot: MeshSnapshot) -> None:
        self._snapshot = snapshot
        self._wake.set()

    def wake(self, _: object = None) -> None:
        """A post arrived (made here or from a peer): embed it soon."""
        self._wake.set()

    def model(self) -> ModelId | None:
        return embedding_model(self._snapshot, self.settings.model)

    def index(self, model: str) -> VectorIndex:
        if self._index is None or self._index.model != model:
            self._index = VectorIndex(model, self._store.vectors(model))
        return self._index

    def forget_expired(self) -> None:
        """Posts expired: their vectors leave the index (the store dropped them already)."""
        if self._index is not None:
            self._index.keep(set(self._store.ids_since(0)))

    def state(self) -> MeaningState:
        model = self.model() or ""
        return MeaningState(self.enabled, model, len(self.index(model)) if model else 0)

    async def embed(self, model: ModelId, texts: Sequence[str], timeout_s: float
                    ) -> list[tuple[float, ...]]:
        """The texts' vectors from the first ready whole replica that answers."""
        request = EmbedRequest(RequestId("bb-" + uuid.uuid4().hex[:24]), model, tuple(texts))
        failures = []
        for worker in ready_replicas(self._snapshot, model, whole_only=True):
            try:
                return await self._call(worker, request, timeout_s)
            except grpc.aio.AioRpcError as exc:
                if isinstance(error := grpc_errors.error_from_rpc(exc), InvalidGenerateRequest):
                    raise EmbeddingRefused(f"{worker.worker_id} refused: {error}") from None
                failures.append(f"{worker.worker_id}: {exc.code().name} {exc.details()}")
        raise EmbeddingUnavailable(f"no worker embedded with {model}: "
                                   + ("; ".join(failures) or "none is ready"))

    async def _call(self, worker: WorkerInfo, request: EmbedRequest, timeout_s: float
                    ) -> list[tuple[float, ...]]:
        if worker.address not in self._channels:
            self._channels[worker.address] = self._security.channel(worker.address)
        stub = worker_pb2_grpc.ShardWorkerStub(self._channels[worker.address])
        start = time.monotonic()
        reply = await stub.Embed(convert.embed_request_to_pb(request), timeout=timeout_s)
        self._metrics.embed_seconds.observe(time.monotonic() - start)
        return list(convert.embeddings_from_pb(reply).vectors)

    async def run(self) -> None:
        """Embed posts without a vector until cancelled; back off while none can be."""
        backoff_s = EMBED_BACKOFF_S
        while True:
            self._wake.clear()
            model = self.model()
            posts = self._store.unembedded(model, EMBED_BATCH) if model else []
            if model is None or not posts:
                await self._wake.wait()
                continue
            try:
                await self._embed_batch(model, posts)
            except EmbeddingUnavailable as exc:
                self._metrics.embed_failures.inc()
                log.warning("embedding %d posts failed (retry in %.1f s): %s", len(posts),
                            backoff_s, exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, EMBED_BACKOFF_MAX_S)
                continue
            backoff_s = EMBED_BACKOFF_S
            await asyncio.sleep(BACKFILL_PAUSE_S if len(posts) == EMBED_BATCH else 0)

    async def _embed_batch(self, model: ModelId, posts: Sequence[Post]) -> None:
        try:
            vectors = await self.embed(model, [text_of(p) for p in posts],
                                       self.settings.call_timeout_s)
            blobs = [(p.post_id, to_blob(v)) for p, v in zip(posts, vectors, strict=True)]
        except EmbeddingRefused:
            blobs = [(p.post_id, await self._embed_alone(model, p)) for p in posts]
        stored = self._store.put_vectors(model, blobs)
        if self._index is not None and self._index.model == model:  # else loaded when used
            self._index.add(blobs)
        self._metrics.posts_embedded.inc(stored)

    async def _embed_alone(self, model: ModelId, post: Post) -> bytes:
        """The post's vector from a shorter and shorter text; b"" when none passes."""
        for chars in CHAR_BUDGETS:
            try:
                [vector] = await self.embed(model, [text_of(post, chars)],
                                            self.settings.call_timeout_s)
                return to_blob(vector)
            except EmbeddingRefused as exc:
                refusal = exc
        log.warning("post %s cannot be embedded (%s): it is found by words only",
                    post.post_id, refusal)
        return b""

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
