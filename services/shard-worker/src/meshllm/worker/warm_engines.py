"""One engine process started ahead of need.

An engine process spends about a third of a second before it can read its Load command
(the interpreter, numpy, llama.cpp's libraries), and the worker waits for that on every
load, including the reload of a split's head after one of its stages died, while the
client's stream waits. So the worker keeps one started, idle engine process: the next
load takes it and another one starts behind it. It matches only a load with the same
command line and environment (the kernel switches of a model's numerics are read once per
process), otherwise a process starts as before and the idle one is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

from meshllm.worker.child import ChildProcess

Key = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]


def _key(argv: Sequence[str], env: Mapping[str, str]) -> Key:
    return tuple(argv), tuple(sorted(env.items()))


class WarmEngines:
    def __init__(self) -> None:
        self._waiting: tuple[Key, asyncio.Task[ChildProcess]] | None = None

    def prepare(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        """Starts the idle process for loads of `argv` with `env`, unless one waits. Called
        once a load is done, so that starting it never slows a load down."""
        if self._waiting is None:
            self._waiting = (_key(argv, env), asyncio.create_task(
                ChildProcess.start(argv, env, pipes=True), name="warm engine"))

    async def start(self, argv: Sequence[str], env: Mapping[str, str]) -> ChildProcess:
        """A running process of `argv` with `env`, piped: the idle one when it matches."""
        child = await self._take(_key(argv, env))
        return child if child is not None else await ChildProcess.start(argv, env, pipes=True)

    async def _take(self, key: Key) -> ChildProcess | None:
        if self._waiting is None:
            return None
        waiting_key, task = self._waiting
        self._waiting = None
        if waiting_key != key:
            await self._discard(task)
            return None
        try:
            child = await task
        except OSError:
            return None  # it could not start: the caller starts one and sees why
        return child if child.returncode is None else None

    @staticmethod
    async def _discard(task: asyncio.Task[ChildProcess]) -> None:
        with contextlib.suppress(OSError):
            child = await task
            child.kill()
            await child.wait()

    async def close(self) -> None:
        if self._waiting is not None:
            await self._discard(self._waiting[1])
            self._waiting = None
