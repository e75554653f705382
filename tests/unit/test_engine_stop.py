"""How long a stopping engine is given to exit before it is killed."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshllm.worker.engine_wire import Load
from meshllm.worker.engines import STOP_GRACE_S, stop_grace_s


@pytest.mark.parametrize(("load", "grace_s"), [
    (Load(Path("m.gguf"), 1024, 2), STOP_GRACE_S),  # whole model: it exits on its own
    (Load(Path("m.gguf"), 1024, 2, rpc_endpoints=("10.0.0.2:50052",), stage_layers=(9,)),
     0.0),  # a split's head may sit in a read from a frozen stage: killed at once
], ids=["whole model", "split head"])
def test_a_split_head_is_killed_at_once_and_a_whole_model_gets_a_grace(
        load: Load, grace_s: float) -> None:
    assert stop_grace_s(load) == grace_s
