"""Push to a node that crashed and came back: the other nodes notice the broken stream,
open it again, and push to the restarted node as fast as before. Anti-entropy runs only
once a minute here, so whatever arrives within a second came by push."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial

import pytest
import pytest_asyncio
from meshllm.common.blackboard.types import Draft, PostId

from tests.support.blackboard import BlackboardNode, eventually, start_nodes

pytestmark = pytest.mark.integration

NODE_ARGS = ("--anti-entropy-interval-s", "60", "--peer-timeout-s", "1", "--lease-ttl-s", "10")
PUSH_LATENCY_LIMIT_S = 1.0  # normal push takes milliseconds; anti-entropy here, 60 s
BROKEN = "meshllm_blackboard_gossip_links_broken_total"
REESTABLISHED = "meshllm_blackboard_gossip_links_reestablished_total"


@pytest_asyncio.fixture
async def slow_pull_mesh(etcd: str, tmp_path_factory: pytest.TempPathFactory
                         ) -> AsyncIterator[list[BlackboardNode]]:
    root = tmp_path_factory.mktemp("push-recovery")
    nodes = [BlackboardNode(name, etcd, root, *NODE_ARGS, with_metrics=True)
             for name in ("pa", "pb", "pc")]
    try:
        await start_nodes(nodes)
        for node in nodes:
            await eventually(partial(knows_peers, node, 2), 10, f"{node.name}'s peers")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def knows_peers(node: BlackboardNode, n: int) -> bool:
    async with node.client() as client:
        return len((await client.info()).peers) == n


async def push_latency_s(origin: BlackboardNode, target: BlackboardNode, text: str) -> float:
    """Seconds from a post on `origin` until `target` holds it."""
    async with origin.client() as client:
        started = time.monotonic()
        author = "tester-" + text.replace(" ", "-")  # one author per post: no rate limit
        post_id: PostId = (await client.post(Draft(author, text))).post.post_id

    async def arrived() -> bool:
        return post_id in await target.ids()

    await eventually(arrived, 30, f"{text!r} on {target.name}", poll_s=0.005)
    return time.monotonic() - started


async def test_push_resumes_after_a_peer_is_killed_and_restarted(
        slow_pull_mesh: list[BlackboardNode]) -> None:
    a, b, c = slow_pull_mesh
    before = [await push_latency_s(o, c, f"before {o.name}") for o in (a, b)]
    assert max(before) < PUSH_LATENCY_LIMIT_S

    c.kill()
    # Noticed while idle, not only at the next post.
    for node in (a, b):
        await eventually(partial(_at_least, node, BROKEN, 1), 10,
                         f"{node.name} to count the broken link")
    async with a.client() as client:
        queued = (await client.post(Draft("tester", "while c was down"))).post.post_id

    restarted = time.monotonic()
    c.start()
    await c.wait_ready()
    ready_s = time.monotonic() - restarted
    for node in (a, b):
        await eventually(partial(_at_least, node, REESTABLISHED, 1), 15,
                         f"{node.name} to re-establish its push link")
    relinked_s = time.monotonic() - restarted
    await eventually(lambda: _holds(c, queued), 10, "the post made while c was down")

    after = [await push_latency_s(o, c, f"after {o.name} {i}") for i in range(5) for o in (a, b)]
    print(f"\nrestarted node serving after {ready_s:.2f} s, both links back after "
          f"{relinked_s:.2f} s; push latency to it: max {max(after) * 1000:.1f} ms over "
          f"{len(after)} posts (before the crash: max {max(before) * 1000:.1f} ms)")
    assert max(after) < PUSH_LATENCY_LIMIT_S
    for node in (a, b):
        assert await node.metric(BROKEN, peer="pc") == 1
        assert await node.metric(REESTABLISHED, peer="pc") == 1
    assert await c.metric(BROKEN, peer="pa") == 0  # a fresh process: nothing broke here


async def _at_least(node: BlackboardNode, name: str, value: float) -> bool:
    return await node.metric(name, peer="pc") >= value


async def _holds(node: BlackboardNode, post_id: PostId) -> bool:
    return post_id in await node.ids()
