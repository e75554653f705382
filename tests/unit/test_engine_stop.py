"""How long a stopping engine is given to exit before it is killed, and that a stopped
engine ends the requests it still runs, even when the end of its output never comes (a
process killed while something else holds its pipe): the head of a split is killed at once
when the split is re-planned, and a resumed stream sent to it just before must come back
refused, not wait on it for ever.

The engine here is a stand-in process (these are the worker's pipes, not llama.cpp): it
loads, leaves a descendant holding its stdout, takes a request and never answers it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from meshllm.common.errors import EngineCrashed, EngineUnavailable
from meshllm.common.types import GenerateRequest, ModelId, RequestId, SamplingParams
from meshllm.worker import engine_wire as wire
from meshllm.worker.child import ChildProcess
from meshllm.worker.engines import STOP_GRACE_S, EngineSettings, ProcessEngine, stop_grace_s

STUCK_ENGINE = f"""
import os, subprocess, sys, time
sys.stdin.readline()  # the load
holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(os.environ["HOLDER_PID_FILE"], "w").write(str(holder.pid))
sys.stdout.write({wire.encode(wire.Loaded(1024)).decode()!r})
sys.stdout.flush()
sys.stdin.readline()  # a request, never answered
time.sleep(60)
"""


class StandIn:
    """Starts the stand-in engine where ProcessEngine would start its prepared one."""

    def prepare(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        pass

    async def start(self, argv: Sequence[str], env: Mapping[str, str]) -> ChildProcess:
        return await ChildProcess.start([sys.executable, "-c", STUCK_ENGINE], env, pipes=True)


def settings(tmp_path: Path, rpc: tuple[str, ...]) -> EngineSettings:
    env = {**os.environ, "HOLDER_PID_FILE": str(tmp_path / "holder.pid")}
    return EngineSettings(wire.Load(tmp_path / "model.gguf", 1024, 1, rpc_endpoints=rpc), env)


REQUEST = GenerateRequest(RequestId("r-resume1"), ModelId("m"), text="hello",
                          sampling=SamplingParams(max_tokens=8))


@pytest.mark.parametrize("rpc", [("127.0.0.1:1",), ()], ids=["split head", "whole model"])
async def test_a_request_in_flight_ends_when_its_engine_is_stopped(
        tmp_path: Path, rpc: tuple[str, ...]) -> None:
    engine = ProcessEngine(settings(tmp_path, rpc), warm=StandIn())  # type: ignore[arg-type]
    await engine.start()
    try:
        events = engine.generate(REQUEST)
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)  # the request reached the engine, which sits on it
        assert not waiting.done()
        await engine.stop()
        with pytest.raises(EngineUnavailable, match="was stopped") as raised:
            await asyncio.wait_for(waiting, 5)
        assert not isinstance(raised.value, EngineCrashed)  # refused for now, not broken
    finally:
        os.kill(int((tmp_path / "holder.pid").read_text()), signal.SIGKILL)


@pytest.mark.parametrize(("load", "grace_s"), [
    (wire.Load(Path("m.gguf"), 1024, 2), STOP_GRACE_S),  # whole model: it exits on its own
    (wire.Load(Path("m.gguf"), 1024, 2, rpc_endpoints=("10.0.0.2:50052",), stage_layers=(9,)),
     0.0),  # a split's head may sit in a read from a frozen stage: killed at once
], ids=["whole model", "split head"])
def test_a_split_head_is_killed_at_once_and_a_whole_model_gets_a_grace(
        load: wire.Load, grace_s: float) -> None:
    assert stop_grace_s(load) == grace_s
