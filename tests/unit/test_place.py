"""Table-driven tests of the planner's placement function."""

from __future__ import annotations

import random

import pytest
from meshllm.common.types import ModelId, ModelSpec, Placement, WorkerId, WorkerInfo, whole
from meshllm.planner.place import MiB, PlacementPolicy, place, required_bytes

POLICY = PlacementPolicy(engine_overhead_bytes=0)


def model(name: str, mib: int, layers: int = 10) -> ModelSpec:
    return ModelSpec(ModelId(name), name, mib * MiB, layers, 1, 0, "llama", 1)


def worker(name: str, mib: int) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), f"127.0.0.1:{1000 + len(name)}", "cpu", mib * MiB, 1, 0.0)


CASES = [
    # (description, models, workers, expected hosts per model, unplaced models)
    ("one model, two workers that fit: two replicas",
     [model("a", 100)], [worker("w1", 200), worker("w2", 200)], {"a": ["w1", "w2"]}, []),
    ("only the worker that fits gets it",
     [model("a", 150)], [worker("w1", 100), worker("w2", 200)], {"a": ["w2"]}, []),
    ("nothing fits: unplaced with a reason",
     [model("a", 500)], [worker("w1", 100), worker("w2", 200)], {"a": []}, ["a"]),
    ("no workers at all",
     [model("a", 1)], [], {"a": []}, ["a"]),
    ("two models share one worker when both fit",
     [model("a", 100), model("b", 100)], [worker("w1", 250)], {"a": ["w1"], "b": ["w1"]}, []),
    ("every model gets a replica before any gets a second",
     [model("a", 100), model("b", 100)], [worker("w1", 100), worker("w2", 100)],
     {"a": ["w1"], "b": ["w2"]}, []),
    ("largest model chooses first",
     [model("small", 50), model("big", 150)], [worker("w1", 150), worker("w2", 60)],
     {"big": ["w1"], "small": ["w2"]}, []),
    ("exact fit counts as a fit",
     [model("a", 100)], [worker("w1", 100)], {"a": ["w1"]}, []),
]


@pytest.mark.parametrize(("models", "workers", "hosts", "unplaced"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_place(models: list[ModelSpec], workers: list[WorkerInfo], hosts: dict[str, list[str]],
               unplaced: list[str]) -> None:
    result = place(models, workers, policy=POLICY)
    assert {m: list(p.worker_ids) for m, p in result.items()} == hosts
    assert sorted(m for m, p in result.items() if p.unplaced_reason) == sorted(unplaced)
    for p in result.values():
        assert all(not r.is_split and r.head.layer_end == 10 for r in p.replicas)


def test_unplaced_reason_says_sizes() -> None:
    result = place([model("a", 500)], [worker("w1", 100)], policy=POLICY)
    reason = result[ModelId("a")].unplaced_reason
    assert "needs 500.0 MiB" in reason and "largest worker budget is 100.0 MiB" in reason


def test_no_worker_reason() -> None:
    assert "no worker is registered" in place([model("a", 1)], [])[ModelId("a")].unplaced_reason


def test_max_replicas_caps_copies() -> None:
    workers = [worker(f"w{i}", 200) for i in range(4)]
    result = place([model("a", 100)], workers, policy=PlacementPolicy(0, max_replicas=2))
    assert len(result[ModelId("a")].replicas) == 2


CAP_CASES = [
    # (description, global cap, per-model caps, replicas per model; 4 workers fit 2 each)
    ("no caps: every worker holds both", 0, {}, {"a": 4, "b": 4}),
    ("a per-model cap limits that model only", 0, {"a": 1}, {"a": 1, "b": 4}),
    ("a per-model cap overrides the global one", 2, {"a": 3}, {"a": 3, "b": 2}),
    ("a per-model 0 falls back to the global cap", 2, {"a": 0}, {"a": 2, "b": 2}),
    ("a cap above what fits: what fits", 0, {"a": 9}, {"a": 4, "b": 4}),
    ("caps for models not placed are ignored", 1, {"z": 3}, {"a": 1, "b": 1}),
]


@pytest.mark.parametrize(("global_cap", "caps", "counts"), [c[1:] for c in CAP_CASES],
                         ids=[c[0] for c in CAP_CASES])
def test_per_model_max_replicas(global_cap: int, caps: dict[str, int],
                                counts: dict[str, int]) -> None:
    workers = [worker(f"w{i}", 200) for i in range(4)]
    result = place([model("a", 100), model("b", 100)], workers,
                   policy=PlacementPolicy(0, max_replicas=global_cap),
                   max_replicas={ModelId(m): n for m, n in caps.items()})
    assert {m: len(p.replicas) for m, p in result.items()} == counts


def test_previous_hosts_are_kept_when_they_still_fit() -> None:
    previous = {ModelId("a"): Placement(ModelId("a"), (whole(WorkerId("w3"), 10),), 0)}
    workers = [worker("w1", 300), worker("w2", 300), worker("w3", 150)]
    result = place([model("a", 100)], workers, previous, PlacementPolicy(0, max_replicas=1))
    assert result[ModelId("a")].worker_ids == ("w3",)


@pytest.mark.parametrize(("deterministic", "slots", "kv_bytes"), [
    (False, 1, 64 * 100),      # fast kernels: an f16 cache, as kv_bytes_per_token counts
    (False, 3, 3 * 64 * 100),  # one full context per slot
    (True, 1, 34 * 100),       # deterministic kernels: q8_0, 34 bytes per 32 values
    (True, 3, 3 * 34 * 100),
], ids=["f16", "f16 3 slots", "q8_0", "q8_0 3 slots"])
def test_required_bytes_counts_the_kv_cache_the_engine_allocates_and_overhead(
        deterministic: bool, slots: int, kv_bytes: int) -> None:
    # 64 bytes per token at f16: 32 K and V values in all (4 layers of 4 + 4).
    spec = ModelSpec(ModelId("a"), "a", 1000, 4, 100, 64, "llama", 100, slots=slots,
                     deterministic=deterministic)
    assert required_bytes(spec, PlacementPolicy(engine_overhead_bytes=5)) == 1000 + kv_bytes + 5


def test_deterministic_under_input_order() -> None:
    models = [model("a", 100), model("b", 80), model("c", 60)]
    workers = [worker("w1", 200), worker("w2", 150), worker("w3", 120)]
    first = place(models, workers, policy=POLICY)
    again = place(list(reversed(models)), list(reversed(workers)), policy=POLICY)
    assert first == again


def reference_place(models: list[ModelSpec], workers: list[WorkerInfo],
                    previous: dict[ModelId, Placement]) -> dict[str, list[str]]:
    """The growth rule written plainly (sort every worker for every replica), to check
    that the heap in `place` picks exactly the same hosts."""
    first = place(models, workers, previous, PlacementPolicy(0, max_replicas=1))
    free = {w.worker_id: w.memory_budget_bytes for w in workers}
    hosts = {m.model_id: [r.head.worker_id for r in first[m.model_id].replicas] for m in models}
    for m in models:
        for w in hosts[m.model_id]:
            free[w] -= required_bytes(m, POLICY)
    order = sorted(models, key=lambda m: (-required_bytes(m, POLICY), m.model_id))
    growing = True
    while growing:
        growing = False
        for m in order:
            if not hosts[m.model_id]:
                continue
            held = set(previous[m.model_id].head_ids) if m.model_id in previous else set()
            need = required_bytes(m, POLICY)
            fits = [w for w, f in free.items() if f >= need and w not in hosts[m.model_id]]
            if fits:
                choice = sorted(fits, key=lambda w: (w not in held, -free[w], w))[0]
                hosts[m.model_id].append(choice)
                free[choice] -= required_bytes(m, POLICY)
                growing = True
    return {str(k): sorted(v) for k, v in hosts.items()}


@pytest.mark.parametrize("seed", range(20))
def test_growth_picks_the_hosts_the_plain_rule_picks(seed: int) -> None:
    rng = random.Random(seed)
    models = [model(f"m{i}", rng.choice((50, 100, 150, 300))) for i in range(rng.randint(1, 6))]
    workers = [worker(f"w{i:02d}", rng.choice((100, 200, 450, 700)))
               for i in range(rng.randint(1, 12))]
    previous = {m.model_id: Placement(m.model_id, (whole(WorkerId(rng.choice(workers).worker_id),
                                                         10),), required_bytes(m, POLICY))
                for m in models if rng.random() < 0.5}
    placed = place(models, workers, previous, POLICY)
    got = {str(k): sorted(r.head.worker_id for r in p.replicas) for k, p in placed.items()}
    assert got == reference_place(models, workers, previous)


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_kv_cache_counted_is_the_type_the_engine_allocates(deterministic: bool) -> None:
    from meshllm.worker.engine.batch.numerics import numerics_for

    block = {"q8_0": 34, "f16": 64}[numerics_for(deterministic).kv_type]
    spec = ModelSpec(ModelId("a"), "a", 0, 1, 32, 64, "llama", 32, deterministic=deterministic)
    assert spec.kv_cache_bytes == 32 * block  # 32 tokens of 64 f16 bytes = 32 blocks
