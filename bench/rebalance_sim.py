"""Rebalancing under a shifting demand trace: a discrete-time simulation (1 s steps), one
run, every policy on the same seeded arrivals.

50 workers of 4 GiB, 10 models of 1-4 GiB. Each ready replica serves `--replica-rps`
requests/s (4 slots, so a request holds a slot 2 s); a load takes `--load-s`, and an add
that must wait for an evicted replica to drain 10 s more. A request waits in the gateway's
queue up to 30 s (120 s if it arrived while its model had no ready replica: a cold start)
and is then refused. The trace: after 20 min m3 goes hot (3 -> 30 requests/s), after 40
min the busiest model m0 goes cold (8 -> 0.1), from 60 to 70 min m7 bursts (1 -> 25), and
at 90 min m9, which never had a request, gets 3 a second.

Policies, all starting from the same `place()` (`--start full`: replicas round-robin
until memory is full; `--start sparse`: one replica per model):
  static        that placement, never changed
  mesh-llm      every 60 s (its gossip period): a node with room promotes to the model
                with the most requests per server when it has >= 10 a minute and >= 3x
                the coldest served model's (or none is serving it); with no node free,
                one node of the coldest model that keeps another switches, unloading
                first. mesh-llm/10s: the same rule as often as ours runs
  rebal-early   planner/rebalance.py with `retire_cold_early=True`
  rebalance     planner/rebalance.py as shipped, every 10 s over a 60 s demand window
                (and a 10 s short window), its moves applied as decided

Then bench/planner_scale.py (skip it with --skip-scale).

    .venv/bin/python bench/rebalance_sim.py [--hours 2] [--seed 7] [--start full|sparse]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "common/src"), str(ROOT / "services/planner/src"), str(ROOT)]
from meshllm.planner.demand import RebalancePolicy  # noqa: E402

from bench.rebalance_policies import MeshLlmRule, Rebalancer, Static  # noqa: E402
from bench.rebalance_world import Cluster, SimConfig, TickStats, initial_cluster  # noqa: E402

GIB = 1 << 30
# (name, replica GiB, requests/s before any event)
MODELS = (("m0", 4, 8.0), ("m1", 4, 6.0), ("m2", 3, 5.0), ("m3", 2, 3.0), ("m4", 2, 3.0),
          ("m5", 2, 2.0), ("m6", 1, 2.0), ("m7", 1, 1.0), ("m8", 1, 0.5), ("m9", 1, 0.0))


@dataclass(frozen=True)
class Event:
    label: str
    model: str
    start_s: float
    end_s: float | None  # None: lasts to the end
    rps: float


EVENTS = (Event("m3 goes hot", "m3", 20 * 60, None, 30.0),
          Event("m0 goes cold", "m0", 40 * 60, None, 0.1),
          Event("m7 bursts", "m7", 60 * 60, 70 * 60, 25.0),
          Event("m9 cold start", "m9", 90 * 60, None, 3.0))


def rate(model: str, t: float) -> float:
    base = next(r for name, _, r in MODELS if name == model)
    for event in EVENTS:
        if event.model == model and event.start_s <= t and (event.end_s is None
                                                             or t < event.end_s):
            base = event.rps
    return base


def poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method; fine for the small rates here."""
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def arrivals(cfg: SimConfig) -> dict[str, list[int]]:
    rng = random.Random(cfg.seed)
    ticks = int(cfg.hours * 3600)
    return {name: [poisson(rng, rate(name, t)) for t in range(ticks)] for name, _, _ in MODELS}


@dataclass
class ModelQueue:
    """The gateway's queue for one model: (arrival, how long it may wait), oldest first.
    A request that arrives while the model has no ready replica gets the cold-start bound."""

    waiting: deque[tuple[float, float]] = field(default_factory=deque)
    credit: float = 0.0

    def tick(self, t: float, arrived: int, ready: int, cfg: SimConfig) -> TickStats:
        bound = cfg.queue_timeout_s if ready else cfg.cold_timeout_s
        self.waiting.extend([(t, bound)] * arrived)
        kept = deque(w for w in self.waiting if t - w[0] <= w[1])
        refused, self.waiting = len(self.waiting) - len(kept), kept
        capacity = ready * cfg.replica_rps + self.credit
        served = min(len(self.waiting), int(capacity))
        self.credit = capacity - int(capacity) if served == int(capacity) else 0.0
        waits = [t - self.waiting.popleft()[0] for _ in range(served)]
        return TickStats(arrived, served, refused, sum(1 for w in waits if w > cfg.waited_s),
                         sum(waits))


class Controller(Protocol):
    name: str
    period_s: float

    def step(self, t: float, cluster: Cluster,
             window: Mapping[str, Sequence[TickStats]]) -> tuple[int, int]:
        """Changes `cluster`; answers the loads and unloads it started."""


@dataclass
class Follow:
    """When capacity caught up with an event: ready capacity covers the new rate (a rise)
    or the model holds half the replicas it had (a fall)."""

    event: Event
    held_at_start: int = -1
    after_s: float | None = None

    def check(self, t: float, cluster: Cluster, cfg: SimConfig) -> None:
        e = self.event
        if self.after_s is not None or t < e.start_s or (e.end_s is not None and t >= e.end_s):
            return
        if self.held_at_start < 0:
            self.held_at_start = len(cluster.held(e.model))
        rising = e.rps > rate(e.model, e.start_s - 1)
        caught = (cluster.ready(e.model, t) * cfg.replica_rps >= e.rps if rising
                  else len(cluster.held(e.model)) <= self.held_at_start // 2)
        if caught:
            self.after_s = t - e.start_s


@dataclass
class Result:
    name: str
    arrived: int = 0
    waited: int = 0
    refused: int = 0
    wait_s: float = 0.0
    loads: int = 0
    unloads: int = 0
    follows: list[Follow] = field(default_factory=list)


def simulate(controller: Controller, cfg: SimConfig,
             trace: Mapping[str, Sequence[int]]) -> Result:
    sizes = {name: gib * GIB for name, gib, _ in MODELS}
    cluster = initial_cluster(cfg, sizes)
    queues = {name: ModelQueue() for name in sizes}
    window: dict[str, deque[TickStats]] = {n: deque(maxlen=int(cfg.window_s)) for n in sizes}
    result = Result(controller.name, follows=[Follow(e) for e in EVENTS])
    for tick in range(len(trace["m0"])):
        t = float(tick)
        for name, queue in queues.items():
            stats = queue.tick(t, trace[name][tick], cluster.ready(name, t), cfg)
            window[name].append(stats)
            result.arrived += stats.arrived
            result.waited += stats.waited
            result.refused += stats.refused
            result.wait_s += stats.wait_sum_s
        if tick % int(controller.period_s) == 0:
            loads, unloads = controller.step(t, cluster, window)
            result.loads += loads
            result.unloads += unloads
        for follow in result.follows:
            follow.check(t, cluster, cfg)
    return result


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} s"


def report(results: Sequence[Result], cfg: SimConfig) -> None:
    labels = [f.event.label for f in results[0].follows]
    print(f"{'policy':<13}{'loads':>6}{'unloads':>8}{'moves/h':>8}{'waited>1s':>10}"
          f"{'refused':>8}{'mean wait':>10} " + "".join(f"{label:>15}" for label in labels))
    for r in results:
        print(f"{r.name:<13}{r.loads:>6}{r.unloads:>8}{(r.loads + r.unloads) / cfg.hours:>8.1f}"
              f"{r.waited:>10}{r.refused:>8}{r.wait_s / max(1, r.arrived):>9.2f}s "
              + "".join(f"{_seconds(f.after_s):>15}" for f in r.follows))
    print(f"{results[0].arrived} requests over {cfg.hours:g} h. Event columns: seconds until "
          "ready capacity covered the new rate, or for a fall until the model held half the "
          "replicas it had (never, by design, where nobody needed its memory)")
    ours = results[-1]
    for other in results[:-1]:
        print(f"{ours.name} vs {other.name}: waited x{_ratio(ours.waited, other.waited)}, "
              f"refused x{_ratio(ours.refused, other.refused)}, "
              f"loads x{_ratio(ours.loads, other.loads)}, "
              f"moves x{_ratio(ours.loads + ours.unloads, other.loads + other.unloads)}")


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.3f}" if theirs else ("1 (both 0)" if not ours else "inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--replica-rps", type=float, default=2.0)
    ap.add_argument("--load-s", type=float, default=60.0)
    ap.add_argument("--start", choices=("full", "sparse"), default="full",
                    help="full: place() fills memory first; sparse: one replica per model")
    ap.add_argument("--skip-scale", action="store_true", help="skip the 1,000-worker timing")
    args = ap.parse_args()
    cfg = SimConfig(hours=args.hours, seed=args.seed, replica_rps=args.replica_rps,
                    load_s=args.load_s, start=args.start)
    trace = arrivals(cfg)
    sizes = {name: gib * GIB for name, gib, _ in MODELS}
    controllers: list[Controller] = [
        Static(), MeshLlmRule(cfg, sizes, "mesh-llm", 60.0),
        MeshLlmRule(cfg, sizes, "mesh-llm/10s", 10.0),
        Rebalancer(cfg, sizes, "rebal-early", RebalancePolicy(retire_cold_early=True)),
        Rebalancer(cfg, sizes)]
    report([simulate(c, cfg, trace) for c in controllers], cfg)
    if not args.skip_scale:
        from bench.planner_scale import main as scale
        scale()


if __name__ == "__main__":
    main()
