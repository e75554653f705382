"""Table-driven tests of how many slots a model gets from the memory budget
(`place.slots_that_fit`, `place.size_slots`) and of a round planning with them."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from meshllm.common.types import ModelDeclaration, ModelId, ModelSpec, WorkerId, WorkerInfo
from meshllm.planner.assign import RoundInputs, RoundPolicy, next_placements
from meshllm.planner.config import load_config
from meshllm.planner.place import MiB, PlacementPolicy, required_bytes, size_slots, slots_that_fit

POLICY = PlacementPolicy(engine_overhead_bytes=10 * MiB)
CONTEXT = 1024
PER_SLOT = 10 * MiB  # KV cache of one slot: kv_bytes_per_token x CONTEXT


def model(weights_mib: int = 100, slots: int = 8, *, split: bool = False,
          kv_per_token: int = PER_SLOT // CONTEXT) -> ModelSpec:
    return ModelSpec(ModelId("m"), "m.gguf", weights_mib * MiB, 10, CONTEXT, kv_per_token,
                     "llama", CONTEXT, layer_bytes=(weights_mib * MiB // 10,) * 10,
                     force_split=split, slots=slots, deterministic=False)  # f16 KV


def worker(name: str, mib: int) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", mib * MiB, 1, 0.0)


# 100 MiB of weights + 10 MiB overhead = 110 MiB before any slot; 10 MiB per slot.
@pytest.mark.parametrize(("spec", "free_mib", "wanted", "expected"), [
    (model(), 190, 8, 8),          # exactly 8 slots: an exact fit counts
    (model(), 500, 8, 8),          # never more than asked for
    (model(), 189, 8, 7),          # a byte short of 8: 7
    (model(), 145, 8, 3),          # partial slots round down
    (model(), 120, 8, 1),          # one slot exactly
    (model(), 119, 8, 0),          # not even one slot
    (model(), 50, 8, 0),           # not even the weights
    (model(), 500, 1, 1),          # one asked for, one given
    (model(kv_per_token=0), 110, 8, 8),  # no KV cache: slots cost nothing
    (model(kv_per_token=0), 109, 8, 0),  # ... but the weights must fit
], ids=["exact-8", "more-room", "short-of-8", "rounds-down", "exact-1", "none",
        "no-weights", "one-wanted", "free-kv", "free-kv-too-small"])
def test_slots_that_fit(spec: ModelSpec, free_mib: int, wanted: int, expected: int) -> None:
    assert slots_that_fit(spec, free_mib * MiB, wanted, POLICY) == expected


def test_slots_that_fit_matches_required_bytes() -> None:
    for free in range(100, 300, 7):
        n = slots_that_fit(model(), free * MiB, 8, POLICY)
        if n:
            assert required_bytes(model(slots=n), POLICY) <= free * MiB
        if n < 8:
            assert required_bytes(model(slots=n + 1), POLICY) > free * MiB


@pytest.mark.parametrize(("spec", "budgets_mib", "slots", "noted"), [
    (model(), [190], 8, False),            # fits as asked: unchanged
    (model(), [100, 190], 8, False),       # fits the largest worker: unchanged
    (model(), [150, 140], 4, True),        # fits none at 8, the largest at 4
    (model(), [120], 1, True),             # down to one slot
    (model(), [119, 100], 8, False),       # not even one slot: kept (split or refused)
    (model(split=True), [150], 8, False),  # set to split: its KV is spread, kept
    (model(), [], 8, False),               # no workers yet: kept
], ids=["fits", "fits-largest", "fewer", "one", "none-fit", "force-split", "no-workers"])
def test_size_slots(spec: ModelSpec, budgets_mib: Sequence[int], slots: int,
                    noted: bool) -> None:
    sizing = size_slots(spec, [b * MiB for b in budgets_mib], POLICY)
    assert sizing.spec.slots == slots
    assert bool(sizing.note) is noted
    if noted:
        assert f"{slots} of 8 slots" in sizing.note
        assert sizing.spec == model(slots=slots)  # nothing else changes


def round_for(spec: ModelSpec, workers: Sequence[WorkerInfo]) -> RoundInputs:
    return RoundInputs(specs={spec.model_id: spec},
                       declarations={spec.model_id: ModelDeclaration(spec.model_id, spec.source)},
                       workers={w.worker_id: w for w in workers}, published={}, demand={},
                       now_s=0.0)


ROUND = RoundPolicy(POLICY, fill_free_memory=True)


def test_a_round_places_whole_with_fewer_slots_instead_of_splitting() -> None:
    result = next_placements(round_for(model(), [worker("w1", 150), worker("w2", 150)]), ROUND)
    placement = result.placements[ModelId("m")]
    assert not placement.unplaced_reason
    assert [r.is_split for r in placement.replicas] == [False, False]
    assert result.specs[ModelId("m")].slots == 4
    assert placement.required_bytes == required_bytes(model(slots=4), POLICY)
    assert "4 of 8 slots" in result.slot_notes[ModelId("m")]


def test_a_round_with_room_keeps_the_asked_for_slots() -> None:
    result = next_placements(round_for(model(), [worker("w1", 400)]), ROUND)
    assert result.specs[ModelId("m")].slots == 8 and not result.slot_notes
    assert [r.head.worker_id for r in result.placements[ModelId("m")].replicas] == ["w1"]


def test_a_model_too_big_for_one_slot_still_splits_with_its_slots() -> None:
    workers = [worker("w1", 110), worker("w2", 110), worker("w3", 110)]
    result = next_placements(round_for(model(), workers), ROUND)
    assert [r.is_split for r in result.placements[ModelId("m")].replicas] == [True]
    assert result.specs[ModelId("m")].slots == 8 and not result.slot_notes


def test_a_round_is_stable_with_fewer_slots() -> None:
    workers = [worker("w1", 150)]
    first = next_placements(round_for(model(), workers), ROUND)
    again = next_placements(
        RoundInputs(**{**round_for(model(), workers).__dict__,
                       "published": first.placements}), ROUND)
    assert again.placements == first.placements and again.specs == first.specs


def test_the_planner_asks_for_eight_slots_by_default() -> None:
    assert load_config([], {}).slots == 8
    assert load_config(["--slots", "2"], {}).slots == 2
    assert load_config([], {"MESHLLM_SLOTS": "3"}).slots == 3


class RecordingGroup:
    """Stands in for up's ProcessGroup: keeps each child's argv instead of starting it."""

    def __init__(self) -> None:
        self.argv: dict[str, list[str]] = {}

    def start(self, name: str, argv: list[str], env: object = None) -> None:
        self.argv[name] = argv


@pytest.mark.parametrize(("argv", "env", "slots"), [
    ([], {}, 8), (["--slots", "2"], {}, 2), ([], {"MESHLLM_SLOTS": "5"}, 5),
    (["--slots", "1"], {"MESHLLM_SLOTS": "5"}, 1),
])
def test_up_hands_its_slots_to_the_planner(argv: list[str], env: dict[str, str],
                                           slots: int) -> None:
    from meshllm.cli.up import start_services
    from meshllm.cli.up_config import load_up_config
    from meshllm.common.ports import PortPicker

    cfg = load_up_config(["--worker-memory", "1GiB", *argv], env)
    group = RecordingGroup()
    start_services(group, cfg, "http://127.0.0.1:2379", PortPicker())  # type: ignore[arg-type]
    planner_argv = group.argv["planner"]
    flags = planner_argv[planner_argv.index("meshllm.planner") + 1:]
    assert load_config(flags, {}).slots == slots
