"""The engine process's event stream: wire events on a private copy of stdout."""

from __future__ import annotations

import os
import threading
from typing import IO

from meshllm.worker.engine_wire import Event, encode


class Channel:
    """Writes events as JSON lines, from any thread.

    llama.cpp may print to fd 1; the protocol gets its own descriptor and fd 1 is pointed
    at stderr so that nothing stray lands in the event stream.
    """

    def __init__(self) -> None:
        self._out: IO[bytes] = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, event: Event) -> None:
        line = encode(event)
        with self._lock:
            self._out.write(line)
            self._out.flush()
