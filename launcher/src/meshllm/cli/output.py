"""What `mesh-llm up` prints, written so that losing the output never stops the launcher.

With `mesh-llm up | tee log`, the Ctrl-C that stops the mesh also kills `tee`, and closing
the terminal turns every write into EIO: the launcher still has to stop its children, so a
write that fails silences that stream instead of raising in the middle of the shutdown.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO


def say(text: str, stream: TextIO | None = None) -> None:
    out = sys.stdout if stream is None else stream
    try:
        print(text, file=out, flush=True)
    except OSError:  # BrokenPipeError (EPIPE), or EIO from a terminal that hung up
        silence(out)


def silence(stream: TextIO) -> None:
    """Point `stream` at /dev/null, so that its buffered rest (flushed at exit) goes
    nowhere instead of raising again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
