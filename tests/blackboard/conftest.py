"""Fixtures: a real etcd and three real blackboard nodes, shared by one test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.blackboard import BlackboardNode, start_nodes
from tests.support.procs import Proc, start_etcd

# Fast gossip so that tests wait seconds, not minutes; 1 KiB texts to test the limit.
NODE_ARGS = ("--anti-entropy-interval-s", "0.5", "--max-text-bytes", "1KiB",
             "--peer-timeout-s", "1", "--lease-ttl-s", "6")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("etcd")
    proc: Proc | None = None
    try:
        proc, url = start_etcd(root / "data", root)
        yield url
    finally:
        if proc is not None:
            proc.stop()


@pytest_asyncio.fixture(scope="module")
async def mesh(etcd: str, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[list[BlackboardNode]]:
    root: Path = tmp_path_factory.mktemp("blackboard")
    nodes = [BlackboardNode(name, etcd, root, *NODE_ARGS) for name in ("a", "b", "c")]
    try:
        await start_nodes(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
