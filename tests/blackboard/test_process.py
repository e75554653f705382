"""One blackboard node as a process, on the services' shared skeleton: a bad option exits
2 naming it, SIGTERM stops the node promptly and cleanly, and its calls are traced."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from meshllm.blackboard.__main__ import main
from meshllm.common.blackboard.types import FeedQuery

from tests.blackboard.conftest import NODE_ARGS
from tests.support.blackboard import BlackboardNode


def test_a_bad_option_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--listen", "nowhere"]) == 2
    assert "blackboard: configuration --listen" in capsys.readouterr().err


@pytest.mark.integration
async def test_sigterm_stops_a_node_promptly_and_its_calls_are_traced(
        etcd: str, tmp_path: Path) -> None:
    node = BlackboardNode("traced", etcd, tmp_path, *NODE_ARGS,
                          env={"OTEL_TRACES_EXPORTER": "console"})
    node.start()
    try:
        await node.wait_ready()
        async with node.client() as client:
            assert await client.feed(FeedQuery()) == []
        assert node.proc is not None
        started = time.monotonic()
        node.stop()
        stopped_in_s = time.monotonic() - started
    finally:
        node.stop()
    assert node.proc.popen.returncode == 0, node.proc.log_tail()
    assert stopped_in_s < 5, f"took {stopped_in_s:.1f} s to stop"
    log = node.proc.log_tail(100_000)
    assert '"name": "/meshllm.v1.Blackboard/Feed"' in log, log[-2000:]
    assert '"service.name": "mesh-llm-blackboard"' in log
    assert '"service.instance.id": "traced"' in log
    assert "grpc.health.v1.Health" not in log  # probes are not traced
