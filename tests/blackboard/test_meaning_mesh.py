"""Search by meaning with real processes: etcd, planner, gateway and a worker running
gemma3-270m (tests/support/mesh.py), and blackboard nodes against the same etcd.

gemma3-270m is a small base model: its mean-pooled vectors are weak, so the set below has
topics far apart, and the assertion is the honest one: by meaning the best answer is in
the top 3 at least as often as by words, and more than never. Every query shares no word
(nor the start of one) with its best answer, so word search cannot find it at all. The
numbers are printed (`-s`) for the report.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest
import pytest_asyncio
from meshllm.common.blackboard.types import Draft, PostId, SearchMode
from meshllm.common.blackboard.wire import post_to_pb
from meshllm.v1 import worker_pb2, worker_pb2_grpc

from tests.support.blackboard import BlackboardNode, eventually
from tests.support.mesh import LocalMesh, MeshOptions

pytestmark = pytest.mark.integration

NODE_ARGS = ("--anti-entropy-interval-s", "1", "--peer-timeout-s", "2", "--lease-ttl-s", "6",
             "--posts-per-author-per-minute", "1000")
MODEL = "gemma3-270m"
# (post, a query meaning the same thing in other words)
CASES = [
    ("The gossip protocol replicates every post to all nodes within milliseconds.",
     "how do messages spread between machines"),
    ("Bake the sourdough bread at 230 degrees for forty minutes until golden.",
     "how long should loaves stay inside ovens"),
    ("The football match ended two to one after a late penalty kick.",
     "soccer game score"),
    ("Our GPU ran out of memory while loading the 70B weights.",
     "graphics card exhausted its VRAM"),
    ("The cat sleeps on the warm windowsill all afternoon.",
     "kitten napping in sunshine"),
    ("Heavy rain and thunderstorms are expected tomorrow across the coast.",
     "weather forecast: wet, windy days"),
    ("The stock market fell sharply as investors sold bank shares.",
     "equities dropped; traders panicked"),
    ("Paris is the capital of France, known for the Eiffel Tower.",
     "which European city has an iron landmark"),
    ("Python lists are mutable while tuples are immutable.",
     "programming language data structures"),
    ("The patient was given antibiotics for a bacterial infection.",
     "doctor prescribed medicine to treat sickness"),
]
_WORD = re.compile(r"\w+")


def shares_a_word(post: str, query: str) -> bool:
    tokens = [t.lower() for t in _WORD.findall(post)]
    return any(t.startswith(w.lower()) for t in tokens for w in _WORD.findall(query))


def test_no_query_shares_a_word_with_its_answer() -> None:
    assert not [q for p, q in CASES if shares_a_word(p, q)]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    local = LocalMesh(tmp_path_factory.mktemp("meaning"), MeshOptions(workers=1))
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest_asyncio.fixture(scope="module")
async def nodes(mesh: LocalMesh) -> AsyncIterator[list[BlackboardNode]]:
    root: Path = mesh.root / "boards"
    root.mkdir(exist_ok=True)
    started = [BlackboardNode(name, mesh.etcd_url, root, *NODE_ARGS, with_metrics=True)
               for name in ("ma", "mb")]
    try:
        for node in started:
            node.start()
        for node in started:
            await node.wait_ready()
        yield started
    finally:
        for node in started:
            node.stop()


async def embedded_count(node: BlackboardNode) -> float:
    return await node.metric("meshllm_blackboard_posts_embedded_total")


async def recall_at_3(node: BlackboardNode, ids: list[PostId], mode: SearchMode
                      ) -> tuple[float, set[SearchMode]]:
    found, used = 0, set()
    async with node.client() as client:
        for (_, query), post_id in zip(CASES, ids, strict=True):
            result = await client.search_result(query, 3, mode)
            used.add(result.mode_used)
            found += post_id in [h.post.post_id for h in result.hits]
    return found / len(CASES), used


async def test_queries_in_other_words_find_their_answer(nodes: list[BlackboardNode]) -> None:
    a = nodes[0]
    async with a.client() as client:
        ids = [(await client.post(Draft("tester", text))).post.post_id for text, _ in CASES]

    async def all_embedded() -> bool:
        return await embedded_count(a) >= len(CASES)

    await eventually(all_embedded, 60, "every post embedded")
    recall = {mode: await recall_at_3(a, ids, mode)
              for mode in (SearchMode.WORDS, SearchMode.SEMANTIC, SearchMode.HYBRID)}
    print("RECALL@3", json.dumps({m.value: r for m, (r, _) in recall.items()}))
    assert recall[SearchMode.WORDS] == (0.0, {SearchMode.WORDS})
    semantic, used = recall[SearchMode.SEMANTIC]
    assert used == {SearchMode.SEMANTIC} and semantic > 0
    hybrid, used = recall[SearchMode.HYBRID]
    assert used == {SearchMode.HYBRID} and hybrid >= recall[SearchMode.WORDS][0]
    async with a.client() as client:
        auto = await client.search_result("soccer game score", 3)
    assert (auto.mode_used, auto.note) == (SearchMode.HYBRID, "")


async def test_every_node_embeds_what_reaches_it(mesh: LocalMesh,
                                                 nodes: list[BlackboardNode]) -> None:
    """The measurement behind every-node-embeds (see meshllm.blackboard.embedder).
    Every node embeds: from a post on ma until mb has embedded it. Origin embeds and
    gossips the vector, by its parts: until ma has embedded it, plus the push of a post
    as large as a post with its vector. Cost: Embed calls and bytes per post."""
    a, b = nodes
    texts = [text_of_case(i) for i in range(32)]
    per_post_ms = {n: round(await embed_ms(mesh, texts[:n]) / n, 1) for n in (1, 8, 32)}
    vector_bytes = await vector_wire_bytes(mesh)
    every_node, on_origin, push_plain, push_with_vector = [], [], [], []
    for i in range(5):
        embedded_a, embedded_b = await embedded_count(a), await embedded_count(b)
        async with a.client() as client:
            post = (await client.post(Draft("tester", f"volcanoes erupt, case {i}"))).post
            times = await asyncio.gather(
                eventually(partial(embedded_beyond, a, embedded_a), 30, "embedded on ma", 0.005),
                eventually(partial(has, b, post.post_id), 30, "the post on mb", 0.005),
                eventually(partial(embedded_beyond, b, embedded_b), 30, "embedded on mb", 0.005))
            heavy = (await client.post(Draft("tester", "v" * vector_bytes))).post
            heavy_s = await eventually(partial(has, b, heavy.post_id), 30, "heavy on mb", 0.005)
        on_origin.append(times[0])
        push_plain.append(times[1])
        every_node.append(times[2])
        push_with_vector.append(heavy_s)
        for node, before in ((a, embedded_a), (b, embedded_b)):  # the heavy one too
            await eventually(partial(embedded_beyond, node, before + 1), 30, "heavy embedded")
    post_bytes = len(post_to_pb(post).SerializeToString())
    ms = [round(statistics.median(x) * 1000, 1)
          for x in (every_node, on_origin, push_plain, push_with_vector)]
    print("EMBED_COST", json.dumps({
        "embed_ms_per_post_by_batch": per_post_ms, "post_wire_bytes": post_bytes,
        "vector_wire_bytes": vector_bytes,
        "every_node_searchable_on_peer_ms": ms[0],
        "origin_embedded_ms": ms[1], "push_ms": ms[2], "push_with_vector_ms": ms[3],
        "origin_gossips_vector_searchable_on_peer_ms": round(ms[1] + ms[3], 1),
        "embed_calls_per_post": {"every_node": len(nodes), "origin": 1},
        "extra_bytes_per_push": {"every_node": 0, "origin": vector_bytes}}))
    assert vector_bytes > 10 * post_bytes  # what gossiping vectors would add to each push


def text_of_case(i: int) -> str:
    return CASES[i % len(CASES)][0]


async def embed_ms(mesh: LocalMesh, texts: list[str]) -> float:
    import grpc

    port = mesh.worker_ports["worker-1"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.ShardWorkerStub(channel)
        request = worker_pb2.EmbedRequest(
            request_id="bench", model_id=MODEL,
            inputs=[worker_pb2.EmbedInput(text=t) for t in texts])
        await stub.Embed(request, timeout=60)  # warm
        started = time.monotonic()
        await stub.Embed(request, timeout=60)
        return (time.monotonic() - started) * 1000


async def vector_wire_bytes(mesh: LocalMesh) -> int:
    import grpc

    port = mesh.worker_ports["worker-1"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await worker_pb2_grpc.ShardWorkerStub(channel).Embed(
            worker_pb2.EmbedRequest(request_id="size", model_id=MODEL,
                                    inputs=[worker_pb2.EmbedInput(text="x")]), timeout=60)
    return len(reply.embeddings[0].SerializeToString())


async def has(node: BlackboardNode, post_id: PostId) -> bool:
    return post_id in await node.ids()


async def embedded_beyond(node: BlackboardNode, count: float) -> bool:
    return await embedded_count(node) > count


async def test_with_embeddings_off_search_says_it_used_words(mesh: LocalMesh) -> None:
    node = BlackboardNode("off", mesh.etcd_url, mesh.root / "boards", *NODE_ARGS,
                          "--embed-model", "off")
    try:
        node.start()
        await node.wait_ready()
        async with node.client() as client:
            await client.post(Draft("tester", "words only here"))
            result = await client.search_result("words", 5, SearchMode.SEMANTIC)
        assert result.mode_used is SearchMode.WORDS and "embeddings are off" in result.note
        assert [h.hits for h in result.hits] == [1]
    finally:
        node.stop()


async def test_a_post_made_while_no_worker_exists_is_embedded_later(
        mesh: LocalMesh, nodes: list[BlackboardNode]) -> None:
    a = nodes[0]
    mesh.procs["worker-1"].stop()

    async def no_model() -> bool:
        async with a.client() as client:
            result = await client.search_result("anything", 1, SearchMode.SEMANTIC)
        return result.mode_used is SearchMode.WORDS

    await eventually(no_model, 30, "the node to see no embeddings model")
    async with a.client() as client:
        accepted = await client.post(Draft("tester", "a lighthouse guides ships at night"))
        fallback = await client.search_result("lighthouse", 5)
    assert fallback.mode_used is SearchMode.WORDS and "no worker" in fallback.note
    mesh.start_worker("worker-1")
    mesh.wait_ready(1)

    async def found_by_meaning() -> bool:
        async with a.client() as client:
            result = await client.search_result("beacon for sailors", 50, SearchMode.SEMANTIC)
        return (result.mode_used is SearchMode.SEMANTIC
                and accepted.post.post_id in [h.post.post_id for h in result.hits])

    await eventually(found_by_meaning, 60, "the post embedded once a worker serves")
