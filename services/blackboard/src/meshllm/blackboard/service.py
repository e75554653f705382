"""One blackboard node: gRPC server, SQLite store, etcd registration, gossip tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from meshllm.blackboard.board import Board, BoardSettings
from meshllm.blackboard.config import BlackboardConfig
from meshllm.blackboard.discovery import register, watch_peers
from meshllm.blackboard.embedder import Embedder, EmbedSettings
from meshllm.blackboard.gossip import Gossip, GossipSettings
from meshllm.blackboard.hub import Hub
from meshllm.blackboard.metrics import Metrics
from meshllm.blackboard.rules import Limits
from meshllm.blackboard.search import Searcher
from meshllm.blackboard.servicer import BlackboardServicer
from meshllm.blackboard.storage import PostStore
from meshllm.common import lifecycle
from meshllm.common.blackboard.types import NodeId, Peer
from meshllm.common.grpcutil import NOT_SERVING, SERVING, new_server
from meshllm.common.membership import Registration
from meshllm.common.meshview import follow_mesh
from meshllm.common.store import EtcdStore
from meshllm.v1 import blackboard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "meshllm.v1.Blackboard"


def limits_of(config: BlackboardConfig) -> Limits:
    return Limits(max_text_bytes=config.max_text_bytes,
                  posts_per_author_per_minute=config.posts_per_author_per_minute,
                  retention_ms=int(config.retention_h * 3_600_000), max_posts=config.max_posts)


class Node:
    def __init__(self, config: BlackboardConfig, interceptors: Sequence[Any] = ()) -> None:
        self.config = config
        self.server, self.health, self.port = new_server(config.listen, interceptors,
                                                         config.security)
        self.address = config.advertise_for(self.port)
        self.node_id = NodeId(config.node_id_for(self.port))
        self.metrics = Metrics()
        self.store = PostStore(config.data_dir, self.node_id)
        self.hub = Hub()
        settings = BoardSettings(self.node_id, limits_of(config), config.on_secret == "redact")
        self.board = Board(settings, self.store, self.hub, self.metrics)
        self.gossip = Gossip(GossipSettings(
            self.node_id, anti_entropy_interval_s=config.anti_entropy_interval_s,
            fanout=config.anti_entropy_fanout, peer_rpc_timeout_s=config.peer_timeout_s,
            security=config.security,
        ), self.board, self.metrics)
        self.embedder = Embedder(EmbedSettings(config.embed_model), self.store, self.metrics,
                                 config.security)
        self.board.on_stored(self.embedder.wake)
        servicer = BlackboardServicer(self.board, self.gossip, self.address,
                                      Searcher(self.board, self.embedder))
        pb_grpc.add_BlackboardServicer_to_server(servicer, self.server)
        self.etcd = EtcdStore(config.etcd_url, config.security)
        self._registration: Registration | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.server.start()
        await self.etcd.connect()
        me = Peer(self.node_id, self.address, time.time())
        self._registration = registration = await register(self.etcd, me, self.config.lease)
        self.metrics.watch_lease(lambda: registration.lease_ok)
        # keep_alive handles its own failures; the others start over when they fail: the
        # peer watch from a fresh snapshot, anti-entropy and pruning at their next round.
        self._spawn("keep-alive", registration.keep_alive)
        self._spawn("peer-watch", lambda: watch_peers(self.etcd, self.gossip.set_peers),
                    supervised=True)
        self._spawn("anti-entropy", self.gossip.run_anti_entropy, supervised=True)
        self._spawn("prune", self._prune_forever, supervised=True)
        if self.embedder.enabled:
            self._spawn("mesh-watch", self._follow_mesh, supervised=True)
            self._spawn("embed", self.embedder.run, supervised=True)
        lifecycle.start_metrics(self.config.metrics_port, self.metrics.registry)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, SERVING)
        log.info("blackboard node %s serving on %s (advertised %s), %d posts in %s",
                 self.node_id, self.config.listen, self.address, self.board.count(),
                 self.store.path)

    async def run_until(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; a background task that dies takes the node down."""
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *self._tasks],
                                     return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper:
                task.result()  # raises what killed it
                raise RuntimeError(f"background task {task.get_name()} ended unexpectedly")

    async def stop(self) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, NOT_SERVING)
        # Background tasks first: a keep-alive still running after the withdrawal would
        # find the lease gone and register the node again.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._registration is not None:
            # Peers drop us at once instead of when the lease expires.
            with contextlib.suppress(Exception):
                await self._registration.withdraw()
        self.hub.close()
        # Peers' Gossip streams into us never end by themselves; a short grace lets
        # in-flight unary calls finish without holding shutdown up for long.
        await self.server.stop(grace=1.0)
        await self.gossip.close()
        await self.embedder.close()
        await self.etcd.close()
        self.store.close()
        log.info("blackboard node %s stopped", self.node_id)

    async def _follow_mesh(self) -> None:
        """Which workers serve an embeddings model, from the mesh's etcd snapshot."""
        async for snapshot in follow_mesh(self.etcd):
            self.embedder.set_snapshot(snapshot)

    async def _prune_forever(self) -> None:
        while True:
            if self.board.prune():
                self.embedder.forget_expired()
            self.metrics.posts_stored.set(self.board.count())
            await asyncio.sleep(self.config.prune_interval_s)

    def _spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]],
               supervised: bool = False) -> None:
        coro = (lifecycle.supervise(name, factory, self.metrics.task_restarts) if supervised
                else factory())
        self._tasks.append(asyncio.create_task(coro, name=name))
