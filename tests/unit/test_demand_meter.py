"""The gateway's demand meter on a fake clock, and the rule for when a record is rewritten."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import pytest
from meshllm.common.demand import ModelDemand
from meshllm.common.types import ModelId
from meshllm.gateway.demand import DemandMeter, changed

M, N = ModelId("m"), ModelId("n")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Step = Callable[[DemandMeter, FakeClock], None]


def at(t: float, *actions: Callable[[DemandMeter], None]) -> Step:
    """Move the clock to start + t, then record."""
    def step(meter: DemandMeter, clock: FakeClock) -> None:
        clock.now = 1000.0 + t
        for action in actions:
            action(meter)
    return step


def served(queued_s: float = 0.0, service_s: float = 1.0, tokens: int = 10,
           model: ModelId = M) -> Callable[[DemandMeter], None]:
    def action(meter: DemandMeter) -> None:
        meter.arrived(model)
        meter.admitted(model, queued_s, service_s, tokens)
    return action


def refused(model: ModelId = M) -> Callable[[DemandMeter], None]:
    def action(meter: DemandMeter) -> None:
        meter.arrived(model)
        meter.refused(model)
    return action


def run(steps: list[Step], now: float, window_s: float = 60.0, recent_s: float = 10.0
        ) -> dict[ModelId, ModelDemand]:
    clock = FakeClock()
    meter = DemandMeter(clock, window_s, recent_s)
    for step in steps:
        step(meter, clock)
    return {d.model_id: d for d in meter.snapshot(1000.0 + now)}


CASES = {
    # name: (steps, snapshot time, expected figures of M)
    "rates over the full window": (
        [at(float(t), served(0.5, 2.0, 30)) for t in range(0, 120, 2)], 119.5,
        dict(window_s=60.0, requests_per_s=0.5, mean_service_s=2.0, mean_queue_wait_s=0.5,
             generated_tokens_per_s=15.0, refused_per_s=0.0)),
    "means weigh every request": (
        [at(70.0, served(1.0, 1.0)), at(80.0, served(3.0, 5.0))], 90.0,
        dict(mean_queue_wait_s=2.0, mean_service_s=3.0, requests_per_s=2 / 60)),
    "old requests leave the window": (
        [at(5.0, served(), served()), at(100.0, served())], 110.0,
        dict(requests_per_s=1 / 60, idle_s=10.0)),
    "a young gateway's window is its uptime": (
        [at(2.0, served(), served()), at(8.0, served())], 20.0,
        dict(window_s=20.0, requests_per_s=3 / 20)),
    "refusals counted apart": (
        [at(70.0, refused(), refused(), served())], 100.0,
        dict(refused_per_s=2 / 60, requests_per_s=1 / 60, mean_service_s=1.0)),
    "the recent window counts arrivals only there": (
        [at(61.0, served()), *[at(95.0 + i, served(), refused()) for i in range(4)]], 100.0,
        dict(recent_requests_per_s=8 / 10, recent_s=10.0)),
    "idle since the last arrival": (
        [at(65.0, served()), at(70.0, refused())], 100.0, dict(idle_s=30.0)),
    "a request without tokens (embeddings)": (
        [at(70.0, served(0.0, 0.2, 0))], 100.0,
        dict(generated_tokens_per_s=0.0, mean_service_s=0.2)),
}


@pytest.mark.parametrize("name", CASES)
def test_figures(name: str) -> None:
    steps, now, expected = CASES[name]
    demand = run(steps, now)[M]
    for field, value in expected.items():
        assert getattr(demand, field) == pytest.approx(value), field


def test_a_model_idle_past_the_window_is_kept_while_declared() -> None:
    clock = FakeClock()
    meter = DemandMeter(clock)
    clock.now += 10
    meter.arrived(M)
    meter.admitted(M, 0, 1, 1)
    meter.arrived(N)
    clock.now += 500
    kept = {d.model_id: d for d in meter.snapshot(keep={M})}
    assert set(kept) == {M}
    assert kept[M].idle_s == pytest.approx(500)
    assert kept[M].requests_per_s == 0
    assert meter.snapshot() == (kept[M],)  # N was forgotten, not just hidden


def test_never_requested_models_are_not_reported() -> None:
    assert DemandMeter(FakeClock()).snapshot(keep={M}) == ()


def test_waiting_requests_are_counted_while_they_wait() -> None:
    clock = FakeClock()
    meter = DemandMeter(clock)
    with meter.waiting(M), meter.waiting(M):
        (demand,) = meter.snapshot()
        assert demand.waiting_requests == 2
        assert demand.idle_s == math.inf  # waiting, yet no arrival was recorded
    with meter.waiting(M):
        pass
    assert meter.snapshot(keep=set()) == ()


def test_waiting_is_counted_down_when_the_wait_fails() -> None:
    meter = DemandMeter(FakeClock())
    with pytest.raises(RuntimeError), meter.waiting(M):
        raise RuntimeError
    assert meter.snapshot() == ()


def test_memory_is_one_bucket_per_second() -> None:
    clock = FakeClock()
    meter = DemandMeter(clock, window_s=10)
    for i in range(1000):
        clock.now = 1000.0 + i * 0.1
        meter.arrived(M)
    (demand,) = meter.snapshot()
    assert len(meter._models[M].buckets) <= 10
    assert demand.recent_requests_per_s == pytest.approx(10, rel=0.1)


BASE = (ModelDemand(M, requests_per_s=1.0, idle_s=1.0),)
CHANGES = {
    "same": (BASE, False),
    "small drift": ((replace(BASE[0], requests_per_s=1.05, idle_s=1.0005),), False),
    "rate up": ((replace(BASE[0], requests_per_s=1.5),), True),
    "waiting": ((replace(BASE[0], waiting_requests=1),), True),
    "another model": ((*BASE, ModelDemand(N)), True),
    "idle grows a lot": ((replace(BASE[0], idle_s=5.0),), True),
}


@pytest.mark.parametrize("name", CHANGES)
def test_changed(name: str) -> None:
    new, expected = CHANGES[name]
    assert changed(BASE, new) is expected
