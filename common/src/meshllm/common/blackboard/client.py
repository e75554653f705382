"""Async gRPC client of a blackboard node, used by the gateway, the CLI and the MCP server.

gRPC failures come back as the typed errors of `meshllm.common.blackboard.errors`,
rebuilt from the reason code the node sent, so callers never see grpc exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from meshllm.common import grpc_errors
from meshllm.common.blackboard import wire
from meshllm.common.blackboard.errors import BlackboardError, BlackboardUnavailable
from meshllm.common.blackboard.types import (
    Accepted,
    BoardInfo,
    Draft,
    FeedQuery,
    Post,
    SearchHit,
    SearchMode,
    SearchResult,
    SubscribeFilter,
)
from meshllm.common.tls import PLAINTEXT, GrpcSecurity
from meshllm.v1 import blackboard_pb2 as pb
from meshllm.v1 import blackboard_pb2_grpc as pb_grpc

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def error_from_rpc(exc: grpc.aio.AioRpcError, address: str) -> BlackboardError:
    """The typed error a failed call stands for. A call that carried no blackboard error
    (the node is down, a deadline passed, a proxy failed) says so with the address."""
    carried = grpc_errors.error_from_rpc(exc)
    if isinstance(carried, BlackboardError):
        return carried
    details = exc.details() or exc.code().name
    if carried is None and exc.code() in _UNREACHABLE:
        return BlackboardUnavailable(
            f"cannot reach the blackboard at {address} ({exc.code().name}: {details}); "
            "check that the node runs and --blackboard points at it")
    return BlackboardError(f"blackboard at {address} failed: {exc.code().name}: {details}")


class BlackboardClient:
    def __init__(self, address: str, timeout_s: float = 10.0,
                 security: GrpcSecurity = PLAINTEXT, interceptors: Sequence[Any] = ()) -> None:
        """`interceptors`: e.g. `telemetry.client_interceptors(tel)`, so that the node's
        spans join the caller's trace."""
        self.address = address
        self._timeout_s = timeout_s
        self._channel = security.channel(address, interceptors=interceptors)
        self._stub = pb_grpc.BlackboardStub(self._channel)

    async def __aenter__(self) -> BlackboardClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.address) from None

    async def info(self) -> BoardInfo:
        return wire.info_from_pb(await self._call(self._stub.GetInfo, pb.GetInfoRequest()))

    async def post(self, draft: Draft) -> Accepted:
        reply: pb.PostReply = await self._call(self._stub.Post, wire.draft_to_pb(draft))
        return Accepted(wire.post_from_pb(reply.post), tuple(reply.redactions))

    async def feed(self, query: FeedQuery) -> list[Post]:
        reply: pb.FeedReply = await self._call(self._stub.Feed, wire.feed_query_to_pb(query))
        return [wire.post_from_pb(p) for p in reply.posts]

    async def search(self, query: str, limit: int = 20,
                     mode: SearchMode = SearchMode.AUTO) -> list[SearchHit]:
        return list((await self.search_result(query, limit, mode)).hits)

    async def search_result(self, query: str, limit: int = 20,
                            mode: SearchMode = SearchMode.AUTO) -> SearchResult:
        """The hits with the mode that ranked them and, when it is not the one asked
        for, a note saying why (e.g. no embeddings model on the mesh)."""
        reply: pb.SearchReply = await self._call(
            self._stub.Search, wire.search_request_to_pb(query, limit, mode))
        return wire.search_result_from_pb(reply)

    async def subscribe(self, wanted: SubscribeFilter | None = None) -> AsyncIterator[Post]:
        """New posts as the node learns of them, until the caller stops iterating."""
        call = self._stub.Subscribe(wire.filter_to_pb(wanted or SubscribeFilter()))
        try:
            async for record in call:
                yield wire.post_from_pb(record)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self.address) from None
        finally:
            call.cancel()
