"""Finding peers: each node registers itself in etcd under a lease, and watches the prefix."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from meshllm.blackboard.peer_wire import peer_from_record
from meshllm.common.blackboard.types import NodeId, Peer
from meshllm.common.blackboard.wire import peer_to_pb
from meshllm.common.errors import InvalidRecord
from meshllm.common.membership import LeaseConfig, Registration
from meshllm.common.store import KeyValueStore, mirror_prefix

log = logging.getLogger(__name__)

# The etcd prefix under which every blackboard node registers itself.
PEERS_PREFIX = "/meshllm/blackboard/"


def peer_key(node_id: NodeId) -> str:
    return PEERS_PREFIX + node_id


def parse_peers(snapshot: Mapping[str, bytes]) -> list[Peer]:
    """The peers in an etcd snapshot. A malformed record is skipped, not fatal: one bad
    node must not hide all the others."""
    peers = []
    for key, raw in sorted(snapshot.items()):
        try:
            peer = peer_from_record(raw)
        except InvalidRecord as exc:
            log.warning("ignoring peer record %s: %s", key, exc)
            continue
        if key != peer_key(peer.node_id):
            log.warning("ignoring peer record %s: it names node %s", key, peer.node_id)
            continue
        peers.append(peer)
    return peers


async def register(store: KeyValueStore, me: Peer, lease: LeaseConfig) -> Registration:
    registration = Registration(store, peer_key(me.node_id), lease)
    await registration.publish(peer_to_pb(me).SerializeToString())
    return registration


async def watch_peers(
    store: KeyValueStore, on_peers: Callable[[list[Peer]], Awaitable[None]]
) -> None:
    async for snapshot in mirror_prefix(store, PEERS_PREFIX):
        await on_peers(parse_peers(snapshot))
