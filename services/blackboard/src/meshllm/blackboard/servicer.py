"""The gRPC edge: messages in, board calls, messages out; typed errors end the call with
their status and reason code (`meshllm.common.grpc_errors`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
from meshllm.blackboard import digest
from meshllm.blackboard.board import Board
from meshllm.blackboard.gossip import Gossip, parse_records
from meshllm.blackboard.peer_wire import bucket_to_pb
from meshllm.blackboard.search import Searcher
from meshllm.common import grpc_errors
from meshllm.common.blackboard import wire
from meshllm.common.blackboard.types import BoardInfo, PostId
from meshllm.common.errors import InvalidRecord, MeshError
from meshllm.v1 import blackboard_pb2 as pb
from meshllm.v1 import blackboard_pb2_grpc as pb_grpc

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_FETCH_IDS = 1000
# The end of year 9999: a time (or a width) beyond it is not a clock's, and two of them
# added would overflow SQLite's 64-bit integers.
MAX_UNIX_MS = 253_402_300_799_999

_Req = TypeVar("_Req")
_Rep = TypeVar("_Rep")
_Handler = Callable[[Any, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Rep]]


def _edge(handler: _Handler[_Req, _Rep]) -> _Handler[_Req, _Rep]:
    @wraps(handler)
    async def wrapped(self: Any, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> _Rep:
        try:
            return await handler(self, request, context)
        except MeshError as exc:
            await grpc_errors.abort(context, exc)
    return wrapped


class BlackboardServicer(pb_grpc.BlackboardServicer):
    def __init__(self, board: Board, gossip: Gossip, address: str,
                 searcher: Searcher | None = None) -> None:
        self._board = board
        self._searcher = searcher or Searcher(board)
        self._gossip = gossip
        self._address = address

    @_edge
    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.BlackboardInfo:
        info = BoardInfo(self._board.settings.node_id, self._board.count(), self._address,
                         self._gossip.peers)
        return wire.info_to_pb(info)

    @_edge
    async def Post(self, request: pb.PostRequest, context: Any) -> pb.PostReply:
        accepted = self._board.post(wire.draft_from_pb(request))
        return pb.PostReply(post=wire.post_to_pb(accepted.post), redactions=accepted.redactions)

    @_edge
    async def Feed(self, request: pb.FeedRequest, context: Any) -> pb.FeedReply:
        query = wire.feed_query_from_pb(request, DEFAULT_LIMIT, MAX_LIMIT)
        return pb.FeedReply(posts=[wire.post_to_pb(p) for p in self._board.feed(query)])

    @_edge
    async def Search(self, request: pb.SearchRequest, context: Any) -> pb.SearchReply:
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        result = await self._searcher.search(request.query, limit,
                                             wire.mode_from_pb(request.mode))
        return wire.search_result_to_pb(result)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PostRecord]:
        try:
            async for post in self._board.subscribe(wire.filter_from_pb(request)):
                yield wire.post_to_pb(post)
        except MeshError as exc:
            await grpc_errors.abort(context, exc)

    async def Gossip(self, request_iterator: AsyncIterator[pb.GossipPush],
                     context: Any) -> AsyncIterator[pb.GossipAck]:
        async for push in request_iterator:
            posts, bad = parse_records(push.posts, _now_ms())
            result = self._board.ingest(posts)
            yield pb.GossipAck(stored=len(result.stored), duplicates=result.duplicates,
                               rejected=result.rejected + bad)

    @_edge
    async def Digest(self, request: pb.DigestRequest, context: Any) -> pb.DigestReply:
        _check_buckets(request.bucket_width_ms, 0)
        buckets = self._board.digest(request.since_unix_ms, request.bucket_width_ms)
        return pb.DigestReply(node_id=self._board.settings.node_id,
                              buckets=[bucket_to_pb(b) for b in buckets])

    @_edge
    async def ListIds(self, request: pb.ListIdsRequest, context: Any) -> pb.ListIdsReply:
        _check_buckets(request.bucket_width_ms, len(request.bucket_starts_unix_ms))
        for start in request.bucket_starts_unix_ms:
            _check_time("bucket start", start)
        ids = self._board.ids_in(request.since_unix_ms, request.bucket_width_ms,
                                 list(request.bucket_starts_unix_ms))
        return pb.ListIdsReply(post_ids=ids)

    @_edge
    async def Fetch(self, request: pb.FetchRequest, context: Any) -> pb.FetchReply:
        if len(request.post_ids) > MAX_FETCH_IDS:
            raise InvalidRecord(f"fetch at most {MAX_FETCH_IDS} ids per call")
        posts = self._board.fetch([PostId(i) for i in request.post_ids])
        return pb.FetchReply(posts=[wire.post_to_pb(p) for p in posts])


def _check_time(what: str, unix_ms: int) -> None:
    if abs(unix_ms) > MAX_UNIX_MS:
        raise InvalidRecord(f"{what} {unix_ms} ms is not a time (beyond year 9999)")


def _check_buckets(width_ms: int, n_buckets: int) -> None:
    if width_ms < 1000:
        raise InvalidRecord(f"bucket width {width_ms} ms is below 1000 ms")
    _check_time("bucket width", width_ms)
    if n_buckets > digest.MAX_BUCKETS:
        raise InvalidRecord(f"{n_buckets} buckets requested; at most {digest.MAX_BUCKETS}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
