"""gRPC plumbing shared by the services: servers with health checking, and a probe."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from meshllm.common.config import process_env
from meshllm.common.errors import ConfigError
from meshllm.common.grpc_guard import MalformedRequestGuard
from meshllm.common.tls import PLAINTEXT, GrpcSecurity, security_from_env

# A peer that vanished without a reset (a cut link, a frozen host) leaves a half-open
# connection that no call notices until its deadline: clients ping every 10 s, calls open
# or not, and drop the connection 5 s after an unanswered ping; servers accept pings that
# often instead of answering them with GOAWAY (too_many_pings).
KEEPALIVE_CLIENT = (("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.max_pings_without_data", 0))
KEEPALIVE_SERVER = (("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                    ("grpc.http2.max_ping_strikes", 0))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def new_server(listen: str, interceptors: Sequence[Any] = (),
               security: GrpcSecurity = PLAINTEXT
               ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A grpc.aio server bound to `listen` with the standard health service attached.

    Returns the server, its health servicer (initially NOT_SERVING) and the bound port,
    which differs from the requested one when port 0 was asked for.
    """
    # The guard goes last, next to the servicers, to parse what they are about to receive.
    server = grpc.aio.server(interceptors=[*interceptors, MalformedRequestGuard()],
                             options=[("grpc.so_reuseport", 0), *KEEPALIVE_SERVER])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = security.add_port(server, listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, health_servicer, port


async def health_status(address: str, service: str = "", timeout_s: float = 3.0,
                        security: GrpcSecurity = PLAINTEXT) -> int | None:
    """The health check's answer (SERVING, NOT_SERVING...), or None when none came."""
    async with security.channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None
        return int(reply.status)


async def check_health(address: str, service: str = "", timeout_s: float = 3.0,
                       security: GrpcSecurity = PLAINTEXT) -> bool:
    return bool(await health_status(address, service, timeout_s, security) == SERVING)


async def answers_health(address: str, timeout_s: float,
                         security: GrpcSecurity = PLAINTEXT) -> bool:
    """Whether the process at `address` is alive: it answers a health check, SERVING or
    not (a worker with nothing loaded, or reloading, says NOT_SERVING and lives)."""
    return await health_status(address, "", timeout_s, security) is not None


def probe_main() -> int:
    """`python -m meshllm.common.grpcutil ADDRESS`: exit 0 when the service is SERVING.

    Container healthchecks use this where no grpc_health_probe binary is available.
    """
    parser = argparse.ArgumentParser(prog="meshllm-health-probe")
    parser.add_argument("address")
    parser.add_argument("--service", default="")
    args, rest = parser.parse_known_args()
    try:  # the same --tls-* flags and MESHLLM_TLS_* variables as the service probed
        security = security_from_env("meshllm-health-probe", process_env(), rest)
    except ConfigError as exc:
        print(f"meshllm-health-probe: {exc}", file=sys.stderr)
        return 2
    ok = asyncio.run(check_health(args.address, args.service, security=security))
    print("SERVING" if ok else "NOT SERVING")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(probe_main())
