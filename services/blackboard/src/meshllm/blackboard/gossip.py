"""Gossip between nodes: push on post, anti-entropy pulls to catch up.

Push is fast but best effort: each peer has a long-lived Gossip stream and a bounded
queue. A stream that breaks (the peer crashed, restarted, was cut off) is noticed at once,
counted, and opened again with backoff; the batch it was carrying is sent again on the new
stream, and posts queued meanwhile follow. A queue that overflowed while the peer was away
drops pushes; those posts arrive by anti-entropy. Anti-entropy is what makes the
replicas converge: every interval a node pulls from a few random peers whatever they hold
that it lacks (digest of time buckets -> ids of differing buckets -> fetch). Since every
node pulls, a post reaches every node that can reach, directly or not, one that has it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from meshllm.blackboard import digest
from meshllm.blackboard.board import Board
from meshllm.blackboard.ids import is_post_id
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.peer_wire import bucket_from_pb, post_from_peer
from meshllm.common.blackboard.types import NodeId, Peer, Post, PostId
from meshllm.common.blackboard.wire import post_to_pb
from meshllm.common.errors import InvalidRecord
from meshllm.common.lifecycle import Backoff
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.v1 import blackboard_pb2 as pb
from meshllm.v1 import blackboard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Reconnect quickly after a peer comes back; the defaults back off to two minutes.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
PUSH_MAX_BATCH = 100
# A broken push stream is opened again after these delays (the channel's own reconnect
# backoff, above, comes on top while the peer is down).
PUSH_BACKOFF_INITIAL_S = 0.2
PUSH_BACKOFF_MAX_S = 2.0
PUSH_BATCH_TRIES = 3  # streams one batch is written on before it is left to anti-entropy
FETCH_BATCH = 256


@dataclass(frozen=True)
class GossipSettings:
    node_id: NodeId
    anti_entropy_interval_s: float = 5.0
    fanout: int = 2                  # peers pulled from per anti-entropy round
    peer_rpc_timeout_s: float = 3.0
    push_ack_timeout_s: float = 5.0
    push_queue: int = 1000           # posts waiting per peer before pushes are dropped
    bucket_width_ms: int = digest.BUCKET_WIDTH_MS
    security: GrpcSecurity = PLAINTEXT  # how peers are dialled


def peer_changes(
    current: Mapping[NodeId, Peer], desired: Iterable[Peer], self_id: NodeId
) -> tuple[list[Peer], list[NodeId]]:
    """Peers to connect to and node ids to disconnect from. A peer whose address
    changed (restarted elsewhere) is both."""
    wanted = {p.node_id: p for p in desired if p.node_id != self_id}
    removed = [n for n, p in current.items() if n not in wanted or wanted[n].address != p.address]
    added = [p for n, p in wanted.items() if n not in current or n in removed]
    return sorted(added, key=lambda p: p.node_id), sorted(removed)


def choose_peers(peers: Sequence[NodeId], fanout: int, rng: random.Random) -> list[NodeId]:
    return rng.sample(list(peers), min(fanout, len(peers)))


def parse_records(records: Iterable[pb.PostRecord], now_unix_ms: int) -> tuple[list[Post], int]:
    """Valid posts, and how many records were refused. One bad record from a peer must
    not keep the good ones in the same message out."""
    posts, bad = [], 0
    for record in records:
        try:
            posts.append(post_from_peer(record, now_unix_ms))
        except InvalidRecord as exc:
            log.warning("refused a post record from a peer: %s", exc)
            bad += 1
    return posts, bad


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class PeerLink:
    """The connection to one peer: its push stream and the anti-entropy calls."""

    def __init__(self, peer: Peer, settings: GossipSettings, board: Board,
                 metrics: Metrics) -> None:
        self.peer = peer
        self._settings = settings
        self._board = board
        self._metrics = metrics
        self._channel = settings.security.channel(peer.address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.BlackboardStub(self._channel)
        self._queue: asyncio.Queue[Post] = asyncio.Queue(settings.push_queue)
        # Sent on a stream that broke before the peer acknowledged them: sent again first.
        self._unacked: list[Post] = []
        self._unacked_tries = 0  # streams the unacknowledged batch was written on
        self.up = False  # a stream to the peer is open and answered
        self._broken_at: float | None = None  # monotonic time the open stream broke
        self._down_reported = False  # the failure to open a stream was logged already
        self._task = asyncio.create_task(self._push_forever(), name=f"push-{peer.node_id}")

    def enqueue(self, post: Post) -> None:
        try:
            self._queue.put_nowait(post)
        except asyncio.QueueFull:
            # Anti-entropy delivers it later; blocking the poster on a slow peer would not.
            self._metrics.push_dropped.labels(peer=self.peer.node_id).inc()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close(None)

    async def _push_forever(self) -> None:
        backoff = Backoff(PUSH_BACKOFF_INITIAL_S, PUSH_BACKOFF_MAX_S)
        while True:
            try:
                await self._push_stream(backoff)
            except Exception as exc:  # whatever broke the stream, a new one replaces it
                self._stream_failed(exc)
                self._drop_unacked_if_stuck()
            await asyncio.sleep(backoff.next())

    def _drop_unacked_if_stuck(self) -> None:
        """A batch that broke the stream on every try may be what breaks it (a peer that
        fails on one of its posts): give it up rather than block every later push."""
        if self._unacked and self._unacked_tries >= PUSH_BATCH_TRIES:
            log.warning("dropping %d posts for %s after %d failed pushes; anti-entropy "
                        "brings them", len(self._unacked), self.peer.node_id,
                        self._unacked_tries)
            self._metrics.push_dropped.labels(peer=self.peer.node_id).inc(len(self._unacked))
            self._unacked = []

    async def _push_stream(self, backoff: Backoff) -> None:
        call = self._stub.Gossip()
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        call.add_done_callback(lambda _: _resolve(ended))
        try:
            # An empty push first: the link counts as up once the peer has answered.
            await self._exchange(call, [])
            self._stream_up()
            backoff.reset()
            while True:
                if not self._unacked:
                    self._unacked, self._unacked_tries = await self._next_batch(ended), 0
                self._unacked_tries += 1
                await self._exchange(call, self._unacked)
                self._unacked = []
        finally:
            call.cancel()

    async def _next_batch(self, ended: asyncio.Future[None]) -> list[Post]:
        """The next posts to push, waiting for one; raises if the stream ends meanwhile,
        so that a peer that died while we were idle is noticed now, not at the next post."""
        first = asyncio.ensure_future(self._queue.get())
        try:
            waiting: set[asyncio.Future[Any]] = {first, ended}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not first.done():
                first.cancel()
        if not first.done() or first.cancelled():
            raise ConnectionError("the peer ended the stream")
        batch = [first.result()]
        while not self._queue.empty() and len(batch) < PUSH_MAX_BATCH:
            batch.append(self._queue.get_nowait())
        return batch

    async def _exchange(self, call: Any, posts: Sequence[Post]) -> None:
        message = pb.GossipPush(from_node=self._settings.node_id,
                                posts=[post_to_pb(p) for p in posts])
        await asyncio.wait_for(call.write(message), self._settings.push_ack_timeout_s)
        ack = await asyncio.wait_for(call.read(), self._settings.push_ack_timeout_s)
        if not isinstance(ack, pb.GossipAck):  # end of stream
            raise ConnectionError("the peer closed the stream")

    def _stream_up(self) -> None:
        self.up, self._down_reported = True, False
        if self._broken_at is not None:
            log.info("push link to %s re-established after %.1f s", self.peer.node_id,
                     time.monotonic() - self._broken_at)
            self._metrics.links_reestablished.labels(peer=self.peer.node_id).inc()
            self._broken_at = None

    def _stream_failed(self, exc: Exception) -> None:
        if self.up:
            self.up = False
            self._broken_at = time.monotonic()
            log.warning("push link to %s broke (%s); reconnecting with backoff, %d posts "
                        "waiting", self.peer.node_id, _short(exc),
                        len(self._unacked) + self._queue.qsize())
            self._metrics.links_broken.labels(peer=self.peer.node_id).inc()
        elif not self._down_reported:
            log.info("push link to %s cannot open yet (%s); retrying with backoff",
                     self.peer.node_id, _short(exc))
        else:  # still down: one line when it went down is enough
            log.debug("push link to %s still down: %s", self.peer.node_id, _short(exc))
        self._down_reported = True

    async def reconcile(self) -> int:
        """Pull what this peer holds and we lack. Returns the number of new posts."""
        timeout = self._settings.peer_rpc_timeout_s
        width = self._settings.bucket_width_ms
        horizon = self._board.horizon_ms()
        reply = await self._stub.Digest(pb.DigestRequest(
            from_node=self._settings.node_id, since_unix_ms=horizon, bucket_width_ms=width),
            timeout=timeout)
        held = self._board.held_ids(horizon)
        starts = digest.differing_buckets(digest.make_buckets(held, width),
                                          [bucket_from_pb(b) for b in reply.buckets])
        if not starts:
            return 0
        listed = await self._stub.ListIds(pb.ListIdsRequest(
            since_unix_ms=horizon, bucket_width_ms=width, bucket_starts_unix_ms=starts),
            timeout=timeout)
        theirs = [PostId(i) for i in listed.post_ids if is_post_id(i)]
        return await self._fetch(digest.missing_ids(held, theirs, horizon))

    async def _fetch(self, missing: Sequence[PostId]) -> int:
        new = 0
        for batch in digest.batches(missing, FETCH_BATCH):
            reply = await self._stub.Fetch(pb.FetchRequest(post_ids=batch),
                                           timeout=self._settings.peer_rpc_timeout_s)
            posts, _ = parse_records(reply.posts, _now_ms())
            new += len(self._board.ingest(posts).stored)
        return new


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _short(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class Gossip:
    """All peer links of a node, kept in step with the peer list from etcd."""

    def __init__(self, settings: GossipSettings, board: Board, metrics: Metrics,
                 rng: random.Random | None = None) -> None:
        self._settings = settings
        self._board = board
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._links: dict[NodeId, PeerLink] = {}
        self._background: set[asyncio.Task[None]] = set()
        board.on_local_post(self.push)

    @property
    def peers(self) -> tuple[Peer, ...]:
        return tuple(link.peer for link in self._links.values())

    def push(self, post: Post) -> None:
        for link in self._links.values():
            link.enqueue(post)

    async def set_peers(self, peers: Iterable[Peer]) -> None:
        current = {n: link.peer for n, link in self._links.items()}
        added, removed = peer_changes(current, peers, self._settings.node_id)
        for node_id in removed:
            log.info("peer %s left", node_id)
            await self._links.pop(node_id).close()
        for peer in added:
            log.info("peer %s joined at %s", peer.node_id, peer.address)
            self._links[peer.node_id] = link = PeerLink(peer, self._settings, self._board,
                                                        self._metrics)
            # A peer that (re)appears may hold what we missed while apart: catch up now
            # rather than at the next round.
            self._spawn(self._reconcile(link))
        self._metrics.peers.set(len(self._links))

    async def run_anti_entropy(self) -> None:
        while True:
            await asyncio.sleep(self._settings.anti_entropy_interval_s)
            chosen = choose_peers(sorted(self._links), self._settings.fanout, self._rng)
            with self._metrics.anti_entropy_seconds.time():
                await asyncio.gather(*(self._reconcile(self._links[n]) for n in chosen))
            self._metrics.posts_stored.set(self._board.count())

    async def _reconcile(self, link: PeerLink) -> None:
        try:
            fetched = await link.reconcile()
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            # An unreachable peer is normal (restarting, cut off); the next round retries.
            log.info("anti-entropy with %s failed: %s", link.peer.node_id, _short(exc))
            self._metrics.anti_entropy_rounds.labels(outcome="failed").inc()
            return
        except Exception:  # anything else is a fault here or there: this pull only
            log.exception("anti-entropy with %s failed", link.peer.node_id)
            self._metrics.anti_entropy_rounds.labels(outcome="failed").inc()
            return
        self._metrics.anti_entropy_rounds.labels(outcome="ok").inc()
        if fetched:
            log.info("anti-entropy fetched %d posts from %s", fetched, link.peer.node_id)
            self._metrics.anti_entropy_fetched.inc(fetched)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for link in self._links.values():
            await link.close()
        self._links.clear()
