"""The three policies bench/rebalance_sim.py compares: static, a mesh-llm-like rule, and
planner/rebalance.py."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from meshllm.common.types import ModelId, WorkerId
from meshllm.planner.demand import (
    CurrentAssignment,
    HeldReplica,
    ModelDemand,
    RebalancePolicy,
    ReplicaPhase,
    SizedModel,
    WorkerCapacity,
)
from meshllm.planner.rebalance import rebalance

from bench.rebalance_world import Cluster, SimConfig, SimReplica, TickStats


class Static:
    name = "static"
    period_s = 3600.0

    def step(self, t: float, cluster: Cluster,
             window: Mapping[str, Sequence[TickStats]]) -> tuple[int, int]:
        return 0, 0


class MeshLlmRule:
    """mesh-llm's promotion rule, one node per gossip period, break-before-make."""

    def __init__(self, cfg: SimConfig, sizes: Mapping[str, int], name: str,
                 period_s: float) -> None:
        self.cfg, self.sizes, self.name, self.period_s = cfg, sizes, name, period_s

    def step(self, t: float, cluster: Cluster,
             window: Mapping[str, Sequence[TickStats]]) -> tuple[int, int]:
        per_minute = {m: float(sum(s.arrived for s in stats)) for m, stats in window.items()}
        servers = {m: len(cluster.held(m)) for m in per_minute}
        hot = _hot(per_minute, servers)
        if hot is None:
            return 0, 0
        holding = {r.worker for r in cluster.held(hot)}
        standby = [w for w in range(len(cluster.budgets))
                   if w not in holding and cluster.free(w) >= self.sizes[hot]]
        if standby:  # a node with room promotes: a load, nothing unloads
            cluster.add(hot, standby[0], t, self.cfg.load_s)
            return 1, 0
        donors = sorted((m for m in servers if m != hot and servers[m] >= 2),
                        key=lambda m: (per_minute[m] / servers[m], m))
        for cold in donors:
            if servers[hot] and (per_minute[hot] / servers[hot]
                                 < 3 * per_minute[cold] / servers[cold]):
                return 0, 0
            worker = self._switchable(cluster, cold, hot)
            if worker is not None:
                cluster.remove(cold, worker)
                cluster.add(hot, worker, t, self.cfg.load_s)
                return 1, 1
        return 0, 0

    def _switchable(self, cluster: Cluster, cold: str, hot: str) -> int | None:
        holding_hot = {r.worker for r in cluster.held(hot)}
        for replica in sorted(cluster.held(cold), key=lambda r: r.worker):
            if (replica.worker not in holding_hot and cluster.free(replica.worker)
                    + self.sizes[cold] >= self.sizes[hot]):
                return replica.worker
        return None


def _hot(per_minute: Mapping[str, float], servers: Mapping[str, int]) -> str | None:
    """A model with requests and no server, else the one with the most requests per
    server if it has >= 10 a minute and >= 3x the coldest served model's."""
    starved = sorted(m for m in per_minute if per_minute[m] > 0 and servers[m] == 0)
    if starved:
        return starved[0]
    served = sorted(m for m in servers if servers[m])
    if not served:
        return None
    hot = max(served, key=lambda m: per_minute[m] / servers[m])
    coldest = min(per_minute[m] / servers[m] for m in served)
    if per_minute[hot] >= 10 and per_minute[hot] / servers[hot] >= 3 * coldest:
        return hot
    return None


RECENT_S = 10  # the gateway's short window (seconds)


def measure(model: str, stats: Sequence[TickStats], service_s: float) -> ModelDemand:
    """What the gateway would publish for the window."""
    seconds = max(1, len(stats))
    served = sum(s.served for s in stats)
    refused = sum(s.refused for s in stats)
    return ModelDemand(
        ModelId(model), float(seconds),
        requests_per_s=max(0, sum(s.arrived for s in stats) - refused) / seconds,
        refused_per_s=refused / seconds,
        mean_service_s=service_s if served else 0.0,
        mean_queue_wait_s=sum(s.wait_sum_s for s in stats) / served if served else 0.0,
        generated_tokens_per_s=served * 200 / seconds,
        recent_requests_per_s=sum(s.arrived for s in list(stats)[-RECENT_S:]) / RECENT_S)


def _held(replica: SimReplica, t: float) -> HeldReplica:
    ready = replica.ready_s <= t
    return HeldReplica(ModelId(replica.model), WorkerId(f"w{replica.worker:02d}"),
                       ReplicaPhase.READY if ready else ReplicaPhase.LOADING,
                       replica.ready_s if ready else replica.started_s)


class Rebalancer:
    period_s = 10.0

    def __init__(self, cfg: SimConfig, sizes: Mapping[str, int], name: str = "rebalance",
                 policy: RebalancePolicy | None = None) -> None:
        self.cfg, self.name, self.policy = cfg, name, policy or RebalancePolicy()
        self.models = [SizedModel(ModelId(m), size, slots=cfg.slots)
                       for m, size in sizes.items()]
        self.last_grew_s: dict[ModelId, float] = {}
        self.last_shrank_s: dict[ModelId, float] = {}
        self.last_request_s: dict[str, float] = {}

    def step(self, t: float, cluster: Cluster,
             window: Mapping[str, Sequence[TickStats]]) -> tuple[int, int]:
        workers = [WorkerCapacity(WorkerId(f"w{i:02d}"), cluster.free(i))
                   for i in range(len(cluster.budgets))]
        current = CurrentAssignment(t, tuple(_held(r, t) for r in cluster.replicas),
                                    dict(self.last_grew_s), dict(self.last_shrank_s))
        service_s = self.cfg.slots / self.cfg.replica_rps  # every request holds a slot this long
        demand = {ModelId(m): self._measure(t, m, stats, service_s)
                  for m, stats in window.items()}
        moves = rebalance(self.models, workers, demand, current, self.policy)
        for retire in moves.retires:
            cluster.remove(retire.model_id, int(retire.worker_id[1:]))
            self.last_shrank_s[retire.model_id] = t
        for add in moves.adds:  # one that waits for a replica to drain starts later
            cluster.add(add.model_id, int(add.worker_id[1:]), t,
                        self.cfg.load_s + (self.cfg.drain_s if add.after else 0.0))
            self.last_grew_s[add.model_id] = t
        return len(moves.adds), len(moves.retires)

    def _measure(self, t: float, model: str, stats: Sequence[TickStats],
                 service_s: float) -> ModelDemand:
        seen = [i for i, s in enumerate(stats) if s.arrived]
        if seen:
            self.last_request_s[model] = t - (len(stats) - 1 - seen[-1])
        idle = t - self.last_request_s.get(model, -math.inf)
        return dataclasses.replace(measure(model, stats, service_s), idle_s=idle)
