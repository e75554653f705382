"""One push link against a scripted peer (in process, a real gRPC server on loopback):
a stream that breaks is opened again and the unacknowledged batch sent again; a batch
that breaks every stream is given up after a few tries instead of blocking the link."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from meshllm.blackboard.board import Board, BoardSettings
from meshllm.blackboard.gossip import PUSH_BATCH_TRIES, GossipSettings, PeerLink
from meshllm.blackboard.hub import Hub
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.rules import Limits
from meshllm.blackboard.storage import PostStore
from meshllm.common.blackboard.types import Draft, NodeId, Peer, Post
from meshllm.common.grpcutil import new_server
from meshllm.v1 import blackboard_pb2 as pb
from meshllm.v1 import blackboard_pb2_grpc as pb_grpc

from tests.support.blackboard import eventually


class ScriptedPeer(pb_grpc.BlackboardServicer):
    """Acknowledges pushes, except that it aborts the first `break_streams` streams at
    their first non-empty push, and every stream that carries `poison`."""

    def __init__(self, break_streams: int = 0, poison: str = "") -> None:
        self.break_streams = break_streams
        self.poison = poison
        self.streams = 0
        self.received: list[str] = []

    async def Gossip(self, request_iterator: AsyncIterator[pb.GossipPush],
                     context: Any) -> AsyncIterator[pb.GossipAck]:
        self.streams += 1
        stream = self.streams
        async for push in request_iterator:
            texts = [p.text for p in push.posts]
            if texts and (stream <= self.break_streams or self.poison in texts):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "peer going down")
            self.received.extend(texts)
            yield pb.GossipAck(stored=len(texts))


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    store = PostStore(tmp_path, NodeId("me"))
    yield Board(BoardSettings(NodeId("me"), Limits()), store, Hub(), Metrics())
    store.close()


async def serve(peer: ScriptedPeer) -> tuple[grpc.aio.Server, str]:
    server, _, port = new_server("127.0.0.1:0")
    pb_grpc.add_BlackboardServicer_to_server(peer, server)
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest_asyncio.fixture
async def link_to(board: Board) -> AsyncIterator[Any]:
    made: list[tuple[PeerLink, grpc.aio.Server]] = []

    async def make(peer: ScriptedPeer, metrics: Metrics) -> PeerLink:
        server, address = await serve(peer)
        link = PeerLink(Peer(NodeId("peer"), address, 0.0),
                        GossipSettings(NodeId("me"), push_ack_timeout_s=2), board, metrics)
        made.append((link, server))
        return link

    yield make
    for link, server in made:
        await link.close()
        await server.stop(None)


def posts(board: Board, *texts: str) -> list[Post]:
    return [board.post(Draft(f"author-{t}", t)).post for t in texts]


def count(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"peer": "peer"}) or 0.0


async def test_a_batch_on_a_broken_stream_is_sent_again_on_the_next(
        board: Board, link_to: Any) -> None:
    peer, metrics = ScriptedPeer(break_streams=1), Metrics()
    link: PeerLink = await link_to(peer, metrics)
    await eventually(lambda: _true(link.up), 5, "the link to open")
    for post in posts(board, "one", "two"):
        link.enqueue(post)
    await eventually(lambda: _true(peer.received == ["one", "two"]), 5, "the resent batch")
    assert peer.streams == 2
    assert count(metrics, "meshllm_blackboard_gossip_links_broken_total") == 1
    assert count(metrics, "meshllm_blackboard_gossip_links_reestablished_total") == 1
    for post in posts(board, "three"):  # and the new stream keeps pushing
        link.enqueue(post)
    await eventually(lambda: _true(peer.received[-1:] == ["three"]), 5, "a later post")


async def test_a_batch_that_breaks_every_stream_is_given_up(
        board: Board, link_to: Any) -> None:
    peer, metrics = ScriptedPeer(poison="bad"), Metrics()
    link: PeerLink = await link_to(peer, metrics)
    await eventually(lambda: _true(link.up), 5, "the link to open")
    for post in posts(board, "bad", "good"):
        link.enqueue(post)
    await eventually(
        lambda: _true(count(metrics, "meshllm_blackboard_push_dropped_total") == 2), 10,
        "the stuck batch to be dropped")
    assert peer.streams == PUSH_BATCH_TRIES
    for post in posts(board, "later"):
        link.enqueue(post)
    await eventually(lambda: _true(peer.received == ["later"]), 5, "the next post")
    assert count(metrics, "meshllm_blackboard_gossip_links_broken_total") == PUSH_BATCH_TRIES


async def test_a_peer_that_is_not_up_yet_is_not_a_broken_link(
        board: Board, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshllm.blackboard.gossip")
    metrics = Metrics()
    server, address = await serve(ScriptedPeer())
    await server.stop(None)  # the address is free now: nothing listens there
    link = PeerLink(Peer(NodeId("peer"), address, 0.0), GossipSettings(NodeId("me")), board,
                    metrics)
    try:
        for post in posts(board, "waiting"):
            link.enqueue(post)
        await eventually(lambda: _true("cannot open yet" in caplog.text), 5, "a failed attempt")
        assert not link.up
        assert count(metrics, "meshllm_blackboard_gossip_links_broken_total") == 0
    finally:
        await link.close()


async def _true(value: bool) -> bool:
    return value
