"""`python -m meshllm.blackboard`: run one blackboard node until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from meshllm.blackboard.config import load_config
from meshllm.blackboard.service import Node
from meshllm.common.config import process_env
from meshllm.common.errors import MeshError
from meshllm.common.logs import setup_logging

log = logging.getLogger("meshllm.blackboard")


async def _serve(argv: Sequence[str]) -> None:
    config = load_config(argv, process_env())
    setup_logging("blackboard", config.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config)
    try:
        await node.start()
        await node.run_until(stop)
    finally:
        await node.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        asyncio.run(_serve(sys.argv[1:] if argv is None else argv))
    except MeshError as exc:
        # Configuration and start-up errors: one clear line, no traceback.
        print(f"blackboard: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
