"""Three real blackboard nodes on a real etcd: replication, catch-up, persistence, rules."""

from __future__ import annotations

import asyncio

import pytest
from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.errors import RateLimited, SecretDetected, TextTooLarge
from meshllm.common.blackboard.types import Draft, FeedQuery, Post, SubscribeFilter

from tests.support.blackboard import BlackboardNode, converged, eventually, start_nodes

pytestmark = pytest.mark.integration


async def holds(node: BlackboardNode, post: Post) -> bool:
    return post.post_id in await node.ids()


async def test_a_post_on_one_node_reaches_the_others(mesh: list[BlackboardNode]) -> None:
    a, b, c = mesh
    async with a.client() as client:
        accepted = await client.post(Draft("alice", "placement done", ("ops",)))
    for node in (b, c):
        async def arrived(n: BlackboardNode = node) -> bool:
            return await holds(n, accepted.post)
        await eventually(arrived, 10, f"the post on {node.name}")
    async with c.client() as client:
        feed = await client.feed(FeedQuery(author="alice", tag="ops"))

        async def knows_both_peers() -> bool:
            # a's push can reach c before c's etcd watch has shown it b
            info = await client.info()
            return sorted(p.node_id for p in info.peers) == ["a", "b"]

        await eventually(knows_both_peers, 10, "c's peer list")
    assert feed == [accepted.post]
    assert accepted.post.origin_node == "a"


async def test_a_subscriber_sees_posts_made_on_other_nodes(mesh: list[BlackboardNode]) -> None:
    a, b, c = mesh
    received: list[Post] = []
    async with c.client() as sub_client, a.client() as on_a, b.client() as on_b:
        async def listen() -> None:
            async for post in sub_client.subscribe(SubscribeFilter(tag="sub")):
                received.append(post)

        listener = asyncio.create_task(listen())
        # The stream gives no signal that it is registered: post probes until one arrives.
        async def probe_arrived() -> bool:
            await on_a.post(Draft(f"probe-{len(received)}", "probe", ("sub",)))
            return bool(received)
        await eventually(probe_arrived, 10, "the subscription to start", poll_s=0.5)
        from_a = (await on_a.post(Draft("alice", "from a", ("sub",)))).post
        from_b = (await on_b.post(Draft("bob", "from b", ("sub",)))).post
        await on_b.post(Draft("bob", "untagged: filtered out"))
        await eventually(lambda: _async_true({from_a, from_b} <= set(received)), 10,
                         "both posts on the subscriber")
        listener.cancel()
    assert {p.origin_node for p in (from_a, from_b)} == {"a", "b"}
    assert all("sub" in p.tags for p in received)


async def _async_true(value: bool) -> bool:
    return value


async def test_a_stopped_node_catches_up_when_restarted(mesh: list[BlackboardNode]) -> None:
    a, b, c = mesh
    c.stop()
    made = []
    async with a.client() as on_a, b.client() as on_b:
        for i in range(3):
            made.append((await on_a.post(Draft("alice", f"while c was down {i}"))).post)
            made.append((await on_b.post(Draft("bob", f"also while c was down {i}"))).post)
    c.start()
    await c.wait_ready()
    await eventually(lambda: converged(mesh), 15, "c to catch up")
    c_ids = await c.ids()
    assert {p.post_id for p in made} <= set(c_ids)
    assert len(c_ids) == len(set(c_ids))
    async with c.client() as client:
        assert (await client.info()).post_count == len(c_ids)


async def test_posts_survive_a_restart_of_every_node(mesh: list[BlackboardNode]) -> None:
    a = mesh[0]
    before = set(await a.ids())
    for node in mesh:
        node.stop()
    a.start()
    await a.wait_ready()
    # No peer runs: whatever a holds now came from its own disk.
    assert set(await a.ids()) == before
    await start_nodes(mesh[1:])
    await eventually(lambda: converged(mesh), 15, "all three to agree again")


async def test_limits_and_scrubber_give_clear_errors(mesh: list[BlackboardNode]) -> None:
    a, b, _ = mesh
    async with a.client() as on_a, b.client() as on_b:
        with pytest.raises(TextTooLarge, match="2000 bytes; the limit is 1024 bytes"):
            await on_a.post(Draft("carol", "x" * 2000))
        with pytest.raises(SecretDetected, match="github-token"):
            await on_a.post(Draft("carol", "deploy with ghp_0123456789abcdefghijABCDEFGHIJ0123"))
        assert await on_a.feed(FeedQuery(author="carol")) == []
        redacted = await on_a.post(Draft("carol", "ask dave@example.org, see /home/dave/notes"))
        assert redacted.redactions == ("email", "home-path")
        assert redacted.post.text == "ask [email], see ~/notes"
        await eventually(lambda: holds(b, redacted.post), 10, "the scrubbed post on b")
        assert (await on_b.feed(FeedQuery(author="carol")))[0].text == redacted.post.text

        for i in range(10):
            await on_a.post(Draft("spammer", f"post {i}"))
        with pytest.raises(RateLimited, match="posts-per-author-per-minute") as limited:
            await on_a.post(Draft("spammer", "one too many"))
        assert 0 < limited.value.retry_after_s <= 60
        # The limit holds mesh-wide once the posts have replicated.
        async def b_has_all() -> bool:
            return len(await on_b.feed(FeedQuery(author="spammer"))) == 10
        await eventually(b_has_all, 10, "spammer's posts on b")
        with pytest.raises(RateLimited):
            await on_b.post(Draft("spammer", "elsewhere"))


async def test_search_ranks_by_hits_then_recency(mesh: list[BlackboardNode]) -> None:
    a, b, _ = mesh
    async with a.client() as on_a, b.client() as on_b:
        once = (await on_a.post(Draft("erin", "quokka sighted"))).post
        twice = (await on_a.post(Draft("erin", "quokka quokka everywhere"))).post
        newer_once = (await on_a.post(Draft("erin", "one more quokka"))).post
        await eventually(lambda: holds(b, newer_once), 10, "posts on b")
        hits = await on_b.search("quokka", limit=10)
    assert [h.post for h in hits] == [twice, newer_once, once]
    assert [h.hits for h in hits] == [2, 1, 1]


async def test_unreachable_node_is_a_clear_error() -> None:
    from meshllm.common.blackboard.errors import BlackboardUnavailable

    async with BlackboardClient("127.0.0.1:1", timeout_s=2) as client:
        with pytest.raises(BlackboardUnavailable, match="cannot reach the blackboard"):
            await client.feed(FeedQuery())
