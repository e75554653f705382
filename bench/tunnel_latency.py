"""What the gRPC tunnel adds to one round trip of a split model's decode step.

A decode step sends a stage one write (the step's inputs and its graph, ~17 KB, coalesced
by mesh-llm's ggml-rpc) and reads one reply (the hidden state, 2.5 KB). This replays that
exchange against a responder that answers like a stage, once over plain TCP and once
through the real tunnel code (TunnelListener -> gRPC Tunnel -> pump_to_stage), with the
tunnel processes on asyncio's own event loop and on uvloop. Each process is separate, as
in the mesh. Prints microseconds per round trip, CPU per round trip of the two tunnel ends,
and ratios against the plain TCP baseline measured in the same run.

    .venv/bin/python bench/tunnel_latency.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.procs import free_port, port_open, wait_until

REQUEST_BYTES = 17_000
REPLY_BYTES = 2_560


def responder(port: int) -> None:
    """Answers every REQUEST_BYTES received with REPLY_BYTES, like a stage's RPC server."""
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = 0
        while data := conn.recv(1 << 16):
            pending += len(data)
            while pending >= REQUEST_BYTES:
                pending -= REQUEST_BYTES
                conn.sendall(b"r" * REPLY_BYTES)


async def stage_side(port: int, rpc_port: int) -> None:
    import grpc
    from meshllm.v1 import worker_pb2, worker_pb2_grpc
    from meshllm.worker.tunnel import pump_to_stage

    class Servicer(worker_pb2_grpc.ShardWorkerServicer):
        async def Tunnel(self, frames: AsyncIterator[worker_pb2.TunnelFrame], context: object
                         ) -> AsyncIterator[worker_pb2.TunnelFrame]:
            await anext(frames)  # the opening frame names the model
            async for frame in pump_to_stage(frames, rpc_port):
                yield frame

    server = grpc.aio.server()
    worker_pb2_grpc.add_ShardWorkerServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def head_side(stage_port: int) -> None:
    from meshllm.worker.tunnel import TunnelListener

    listener = TunnelListener(f"127.0.0.1:{stage_port}", "bench")
    print(await listener.start(), flush=True)
    await asyncio.Event().wait()


def round_trips(endpoint: str, rounds: int) -> float:
    """Mean seconds per request/reply exchange."""
    host, port = endpoint.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = b"q" * REQUEST_BYTES

    def once() -> None:
        conn.sendall(request)
        got = 0
        while got < REPLY_BYTES:
            got += len(conn.recv(1 << 16))

    for _ in range(50):
        once()
    started = time.perf_counter()
    for _ in range(rounds):
        once()
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed / rounds


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            text=True)


def through_tunnel(loop: str, rpc_port: int, rounds: int) -> tuple[float, float]:
    """(seconds per round trip, CPU seconds per round trip of both tunnel ends)."""
    grpc_port = free_port()
    stage = spawn("--role", "stage", "--loop", loop, "--port", str(grpc_port),
                  "--rpc-port", str(rpc_port))
    head = None
    try:
        wait_until(lambda: port_open(grpc_port), 30, "tunnel stage side")
        head = spawn("--role", "head", "--loop", loop, "--port", str(grpc_port))
        assert head.stdout is not None
        endpoint = head.stdout.readline().strip()
        cpu_before = cpu_seconds(stage.pid) + cpu_seconds(head.pid)
        seconds = round_trips(endpoint, rounds)
        cpu = cpu_seconds(stage.pid) + cpu_seconds(head.pid) - cpu_before
        return seconds, cpu / (rounds + 50)
    finally:
        for proc in (stage, head):
            if proc is not None:
                proc.kill()
                proc.wait()


def run_role(args: argparse.Namespace) -> None:
    if args.role == "responder":
        responder(args.port)
        return
    main = stage_side(args.port, args.rpc_port) if args.role == "stage" else head_side(args.port)
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--role", choices=("responder", "stage", "head"))
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rpc-port", type=int, default=0)
    args = parser.parse_args()
    if args.role:
        run_role(args)
        return 0
    rpc_port = free_port()
    stage = spawn("--role", "responder", "--port", str(rpc_port))
    try:
        wait_until(lambda: port_open(rpc_port), 30, "responder")
        direct = round_trips(f"127.0.0.1:{rpc_port}", args.rounds)
        print(f"Tunnel round trip, {REQUEST_BYTES} B up and {REPLY_BYTES} B down, "
              f"{args.rounds} rounds")
        print(f"  plain TCP          {direct * 1e6:7.1f} us")
        for loop in ("asyncio", "uvloop"):
            seconds, cpu = through_tunnel(loop, rpc_port, args.rounds)
            print(f"  tunnel, {loop:<10} {seconds * 1e6:7.1f} us  (+{(seconds - direct) * 1e6:6.1f}"
                  f" us, {seconds / direct:4.1f}x TCP)   tunnel CPU {cpu * 1e6:6.1f} us")
    finally:
        stage.kill()
        stage.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
