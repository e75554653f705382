"""`python -m meshllm.blackboard`: run one blackboard node until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from meshllm.blackboard.config import BlackboardConfig, load_config
from meshllm.blackboard.service import Node
from meshllm.common import lifecycle, telemetry


async def serve(config: BlackboardConfig, stop: asyncio.Event) -> None:
    # The instance is the configured node id; a derived one (HOSTNAME-PORT) is known only
    # once the server has bound its port, after the interceptors had to exist.
    tel = telemetry.build_telemetry(config.trace, instance=config.node_id)
    node = Node(config, telemetry.server_interceptors(tel))
    try:
        await lifecycle.unless_stopped(stop, node.start())
        await node.run_until(stop)
    finally:
        await node.stop()
        tel.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    return lifecycle.service_main("blackboard", load_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
