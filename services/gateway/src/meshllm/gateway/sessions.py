"""Sticky sessions: a conversation that names itself (the request's `user` field or an
`X-Session-Id` header) goes to one replica, chosen by rendezvous hashing, so that its KV
cache is reused there; most useful for expert shards, where each shard also answers a
little differently.

Rendezvous (highest random weight): each replica's weight for a session is a hash of the
two; the session goes to the heaviest. Every gateway computes the same order without
sharing any state, and when a replica goes only the sessions it was first for move, each
to its own next heaviest. A request without a session falls back to prefix affinity
(affinity.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from meshllm.common.types import ChatMessage, ModelId, WorkerId, WorkerInfo
from meshllm.gateway.affinity import prefix_keys

SESSION_HEADER = "x-session-id"
MAX_SESSION_CHARS = 256  # longer names are cut (they only feed a hash)

W = TypeVar("W", bound=WorkerInfo)


def _hash(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def session_key(model_id: ModelId, session: str) -> int:
    """The session's key for one model (0: no session)."""
    if not session:
        return 0
    return _hash("session", model_id, session[:MAX_SESSION_CHARS]) or 1


def weight(session: int, worker_id: WorkerId) -> int:
    return _hash(str(session), worker_id)


def rendezvous(session: int, replicas: Sequence[W]) -> list[W]:
    """The replicas in the session's order: heaviest first, ties by id."""
    return sorted(replicas, key=lambda w: (-weight(session, w.worker_id), w.worker_id))


class RouteKeys(tuple[int, ...]):
    """A request's prompt-prefix keys (affinity.prefix_keys) that also carry its session
    key, so that they reach routing wherever the prefix keys go."""

    session: int

    def __new__(cls, prefixes: Sequence[int], session: int = 0) -> RouteKeys:
        keys = super().__new__(cls, prefixes)
        keys.session = session
        return keys


def route_keys(model_id: ModelId, text: str | None, chat: Sequence[ChatMessage] | None,
               tools_json: str, session: str) -> RouteKeys:
    """Prefix keys of the prompt, with the session's key."""
    prefixes = prefix_keys(model_id, text, chat, tools_json)
    return RouteKeys(prefixes, session_key(model_id, session))


def session_of(prefixes: Sequence[int]) -> int:
    return prefixes.session if isinstance(prefixes, RouteKeys) else 0
