"""Child processes of the worker (engines, RPC stage servers) without the event loop's
subprocess transports.

The services run on uvloop, and with gRPC's threads busy, uvloop's subprocess pipes came
back already closed in about 1 spawn of 100 (a test spawning 1,500 children beside a
busy gRPC server: 10 failures; asyncio's loop: none). A worker then never heard from its
engine. CPython's `subprocess` with a reader and a writer thread had no failure in 1,500,
so that is what this does; the event loop only sees lines arriving on a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO

# Run before the child's own program: the kernel kills the child when the worker's thread
# that started it exits (a thread of the loop's default executor, which lives until the loop
# shuts it down after the worker has stopped its children), so a worker killed outright
# takes its engines along. Set after exec in a small interpreter, not in a preexec_fn:
# forking a process busy with gRPC threads aborts the child (and upsets gRPC in the parent).
_DIE_WITH_WORKER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the worker died before prctl: nothing would stop this child\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def _dying_with_worker(argv: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_WORKER, str(os.getpid()), *argv]


class ChildProcess:
    """The part of asyncio.subprocess.Process the worker uses: lines in, lines out."""

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        if popen.stdout is not None:
            threading.Thread(target=self._read, args=(popen.stdout, loop), daemon=True).start()
        if popen.stdin is not None:
            threading.Thread(target=self._write, args=(popen.stdin,), daemon=True).start()

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str], *, pipes: bool
                    ) -> ChildProcess:
        """Start `argv`; with `pipes`, its stdin and stdout carry lines, else stdout is
        discarded. stderr is the worker's (its log)."""
        stream = subprocess.PIPE if pipes else subprocess.DEVNULL
        popen = await asyncio.to_thread(
            subprocess.Popen, _dying_with_worker(argv), env=dict(env), stdout=stream,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL)
        return cls(popen, asyncio.get_running_loop())

    def _read(self, stdout: IO[bytes], loop: asyncio.AbstractEventLoop) -> None:
        for line in stdout:
            loop.call_soon_threadsafe(self._lines.put_nowait, line)
        with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
            loop.call_soon_threadsafe(self._lines.put_nowait, b"")

    def _write(self, stdin: IO[bytes]) -> None:
        while (data := self._outgoing.get()) is not None:
            try:
                stdin.write(data)
                stdin.flush()
            except (BrokenPipeError, ValueError):
                return  # the child is gone; its reader reports the end
        with contextlib.suppress(BrokenPipeError, ValueError):
            stdin.close()

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def write_line(self, data: bytes) -> None:
        """Queue `data` for the child's stdin, in order; never blocks the event loop."""
        self._outgoing.put(data)

    def close_stdin(self) -> None:
        self._outgoing.put(None)

    async def read_line(self) -> bytes:
        """The next line from the child's stdout; b"" once it has closed."""
        line = await self._lines.get()
        if not line:
            self._lines.put_nowait(b"")  # every later reader sees the end too
        return line

    async def wait(self) -> int:
        return await asyncio.to_thread(self._popen.wait)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()
