"""Worker budgets for MoE mesh tests: room for one expert shard, never the whole model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from meshllm.common.models import describe
from meshllm.planner.experts import shard_need
from meshllm.planner.place import PlacementPolicy, required_bytes


def shard_budget(path: Path, context: int, slots: int, shard_experts: int) -> int:
    """Holds a shard of `shard_experts` experts with its slots, not one more expert, and
    not the model whole."""
    spec = dataclasses.replace(describe(str(path), context), slots=slots)
    overhead = PlacementPolicy().engine_overhead_bytes
    budget = shard_need(spec, shard_experts, overhead) + (1 << 20)
    assert budget < shard_need(spec, shard_experts + 1, overhead)
    assert budget < required_bytes(dataclasses.replace(spec, slots=1), PlacementPolicy())
    return budget
