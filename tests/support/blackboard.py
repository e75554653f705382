"""Blackboard nodes as real processes, and a TCP proxy that can cut the network."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from meshllm.common.blackboard.client import BlackboardClient
from meshllm.common.blackboard.types import FeedQuery, PostId
from meshllm.common.grpcutil import check_health
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import Proc, free_port, python_module


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str,
                     poll_s: float = 0.1) -> float:
    """Wait until `check()` is true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class BlackboardNode:
    """One `python -m meshllm.blackboard` process; restartable on the same port and data."""

    def __init__(self, name: str, etcd_url: str, root: Path, *extra: str,
                 advertise: str = "", port: int = 0, env: dict[str, str] | None = None,
                 with_metrics: bool = False) -> None:
        self.name = name
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = root / name
        self.metrics_port = free_port() if with_metrics else 0
        self._argv = python_module(
            "meshllm.blackboard", "--listen", self.address, "--etcd", etcd_url,
            "--data-dir", str(self.data_dir), "--node-id", name,
            *(("--advertise-address", advertise) if advertise else ()),
            *(("--metrics-port", str(self.metrics_port)) if with_metrics else ()), *extra)
        self._log_dir = root
        self._env = env
        self.proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc(f"blackboard-{self.name}", self._argv, self._log_dir, self._env)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        async def serving() -> bool:
            if self.proc is not None and not self.proc.alive():
                raise RuntimeError(f"node {self.name} exited:\n{self.proc.log_tail()}")
            return await check_health(self.address, timeout_s=1.0)
        await eventually(serving, timeout_s, f"blackboard {self.name} to serve")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        """SIGKILL: no withdrawal from etcd, no closed streams, as in a crash."""
        if self.proc is not None:
            self.proc.kill(signal.SIGKILL)
            self.proc.popen.wait(5)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from the node's /metrics (0 when absent); needs `with_metrics`."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode())

        for family in text_string_to_metric_families(await asyncio.to_thread(scrape)):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def client(self) -> BlackboardClient:
        return BlackboardClient(self.address)

    async def ids(self) -> list[PostId]:
        async with self.client() as client:
            return [p.post_id for p in await client.feed(FeedQuery(limit=1000))]


async def start_nodes(nodes: Sequence[BlackboardNode]) -> None:
    for node in nodes:
        node.start()
    await asyncio.gather(*(n.wait_ready() for n in nodes))


async def converged(nodes: Sequence[BlackboardNode]) -> bool:
    """Every node holds the same set of posts, each once."""
    listings = await asyncio.gather(*(n.ids() for n in nodes))
    return all(len(ids) == len(set(ids)) and set(ids) == set(listings[0]) for ids in listings)


class TcpProxy:
    """Forwards a local port to a target. `cut()` stops forwarding in both directions:
    bytes in flight are held, not dropped, and new connections are accepted but stall,
    as on a network that lost its route; `heal()` lets everything flow again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:  # closed with the others, not left to the loop's teardown
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        try:
            await self._flowing.wait()
        except asyncio.CancelledError:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass  # the other side went away: close ours too
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                dst.close()
