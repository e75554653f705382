"""A user-space TCP proxy for benchmarks: counts bytes and can delay each direction.

The kernel here has no netem qdisc, so latency is injected in user space: every chunk
is forwarded `delay_s` after it arrived, in order, in each direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass


@dataclass
class Counters:
    to_server: int = 0
    to_client: int = 0


class DelayProxy:
    """Listens on 127.0.0.1:<port> and forwards to `target`, in a thread of its own."""

    def __init__(self, target: tuple[str, int], delay_s: float = 0.0) -> None:
        self.target = target
        self.delay_s = delay_s
        self.counters = Counters()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - self._loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        while data := await reader.read(1 << 20):
            if upstream:
                self.counters.to_server += len(data)
            else:
                self.counters.to_client += len(data)
            queue.put_nowait((self._loop.time() + self.delay_s, data))
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError):
            await sender

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, server_writer, True),
                             self._pipe(server_reader, writer, False),
                             return_exceptions=True)

    def reset(self) -> None:
        self.counters = Counters()
