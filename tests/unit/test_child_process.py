"""The worker's child processes: lines in and out in order, the end seen by every reader,
and spawning that holds up on uvloop beside a busy gRPC server (where uvloop's own
subprocess pipes came back closed about once in a hundred spawns)."""

from __future__ import annotations

import asyncio
import sys

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from meshllm.worker.child import ChildProcess

ECHO = [sys.executable, "-c",
        "import sys\nfor line in sys.stdin: print(line.strip().upper(), flush=True)"]


async def test_lines_in_order_then_the_end() -> None:
    child = await ChildProcess.start(ECHO, {}, pipes=True)
    for word in ("alpha", "beta", "gamma"):
        child.write_line(f"{word}\n".encode())
    assert [await child.read_line() for _ in range(3)] == [b"ALPHA\n", b"BETA\n", b"GAMMA\n"]
    child.close_stdin()
    assert await child.wait() == 0
    assert await child.read_line() == b"" and await child.read_line() == b""
    assert child.returncode == 0


async def test_kill_ends_the_output() -> None:
    child = await ChildProcess.start(ECHO, {}, pipes=True)
    child.kill()
    assert await child.wait() < 0
    assert await child.read_line() == b""
    child.write_line(b"nobody reads this\n")  # must not raise or block


async def _spawn_beside_busy_grpc(spawns: int) -> int:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    busy = True

    async def hammer() -> None:
        while busy:
            await stub.Check(health_pb2.HealthCheckRequest())

    callers = [asyncio.create_task(hammer()) for _ in range(4)]
    answered = 0
    for i in range(spawns):
        child = await ChildProcess.start(ECHO, {}, pipes=True)
        child.write_line(f"n{i}\n".encode())
        answered += await asyncio.wait_for(child.read_line(), 30) == f"N{i}\n".encode()
        child.close_stdin()
        await child.wait()
    busy = False
    await asyncio.gather(*callers)
    await channel.close()
    await server.stop(None)
    return answered


def test_spawning_on_uvloop_beside_busy_grpc() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(_spawn_beside_busy_grpc(200)) == 200
