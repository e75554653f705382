"""A network cut between two nodes heals: a TCP proxy carries all their traffic, and the
test stops it forwarding, posts on both sides, then lets it forward again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from meshllm.common.blackboard.types import Draft

from tests.blackboard.conftest import NODE_ARGS
from tests.support.blackboard import BlackboardNode, TcpProxy, converged, eventually, start_nodes
from tests.support.procs import free_port

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module")
async def pair(etcd: str, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[tuple[BlackboardNode, BlackboardNode, list[TcpProxy]]]:
    """Nodes x and y, each advertising a proxy in front of itself: every byte one sends
    the other goes through a proxy. The module's own etcd keeps other nodes away."""
    root: Path = tmp_path_factory.mktemp("partition")
    proxies, nodes = [], []
    for name in ("x", "y"):
        port = free_port()
        proxy = TcpProxy(port)
        await proxy.start()
        node = BlackboardNode(name, etcd, root, *NODE_ARGS, port=port,
                              advertise=f"127.0.0.1:{proxy.port}")
        proxies.append(proxy)
        nodes.append(node)
    try:
        await start_nodes(nodes)
        yield nodes[0], nodes[1], proxies
    finally:
        for node in nodes:
            node.stop()
        for proxy in proxies:
            await proxy.close()


async def test_a_network_cut_heals(
    pair: tuple[BlackboardNode, BlackboardNode, list[TcpProxy]]
) -> None:
    x, y, proxies = pair
    async with x.client() as on_x, y.client() as on_y:
        before = (await on_x.post(Draft("xavier", "before the cut"))).post
        await eventually(lambda: _has(y, before.post_id), 10, "the first post on y")

        for proxy in proxies:
            proxy.cut()
        during_x = [(await on_x.post(Draft("xavier", f"x side {i}"))).post for i in range(3)]
        during_y = [(await on_y.post(Draft("yolanda", f"y side {i}"))).post for i in range(3)]
        await asyncio.sleep(2.0)  # several anti-entropy rounds, all failing
        assert not {p.post_id for p in during_x} & set(await y.ids()), "the cut leaked"
        assert not {p.post_id for p in during_y} & set(await x.ids()), "the cut leaked"

        for proxy in proxies:
            proxy.heal()
        await eventually(lambda: converged([x, y]), 20, "x and y to converge after the cut")
    ids = await x.ids()
    assert {p.post_id for p in (before, *during_x, *during_y)} == set(ids)
    assert len(ids) == len(set(ids)) == 7


async def _has(node: BlackboardNode, post_id: str) -> bool:
    return post_id in await node.ids()
