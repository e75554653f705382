"""A user-space TCP proxy that can cut the link without telling either side: a network
partition as the peers see it (no FIN, no RST; bytes simply stop arriving), which only
timeouts, keepalive pings or the gateway's progress watchdog can detect."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class CutProxy:
    """Listens on 127.0.0.1:<port> and forwards to `target`, in a thread of its own."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self._flowing = True
        self._frozen: list[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._frozen += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                if not self._flowing:
                    continue  # dropped: the far side never hears of it
                writer.write(data)
                await writer.drain()
        writer.close()

    def cut(self) -> None:
        """Stop forwarding, in both directions, on every connection; tell no one."""
        self._flowing = False

    def restore(self) -> None:
        """Close the connections the cut froze (their peers then see them end, as when a
        partition heals and the stale connection is reset) and forward again."""
        def heal() -> None:
            for writer in self._frozen:
                writer.transport.abort()
            self._frozen.clear()
            self._flowing = True

        self._loop.call_soon_threadsafe(heal)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
