"""A request for a model with no ready replica waits while one comes up (a cold start:
the model was just declared, or its replica is loading), for a bounded time."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshllm.gateway.routing import Serving

T = TypeVar("T")


async def wait_for_replicas(ready: Callable[[], list[T]], state: Callable[[], Serving],
                            changed: Callable[[float], Awaitable[None]], wait_s: float,
                            clock: Callable[[], float] = time.monotonic) -> list[T]:
    """The ready replicas: at once when there are; else looked for again after each change
    of the mesh (`changed(timeout_s)` returns at the next one, or after the timeout) while
    one may still come up and for `wait_s` at most. [] when none came: the caller answers
    why, at once for a model that cannot be served (waiting would not help)."""
    deadline = clock() + wait_s
    while True:
        found = ready()
        if found:
            return found
        left = deadline - clock()
        if left <= 0 or not state().coming:
            return []
        await changed(left)
