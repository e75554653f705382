"""Demand: what the gateways measure per model and publish under their leases, and what
the planner's rebalancing sizes models by. Converted to and from protobuf here only."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from meshllm.common.errors import InvalidRecord
from meshllm.common.records import decode_record
from meshllm.common.types import ModelId
from meshllm.v1 import mesh_pb2


@dataclass(frozen=True)
class ModelDemand:
    """One model's demand over the gateway's sliding window, as totals over all its replicas.

    Totals, not per replica: the gateway sees every request to a model whichever replica
    serves it, and totals stay true while replicas come and go, where per-replica figures
    would go stale at every move. The load per replica is derived from them (`offered_load`
    over the replicas that served the window)."""

    model_id: ModelId
    window_s: float = 60.0               # how long the figures cover
    requests_per_s: float = 0.0          # admitted requests
    refused_per_s: float = 0.0           # answered 429 or 503 (queue full, no replica)
    mean_service_s: float = 0.0          # a request's time in a slot, first token to end
    mean_queue_wait_s: float = 0.0       # admitted requests' wait for a slot
    generated_tokens_per_s: float = 0.0  # shown in the status and the console
    recent_requests_per_s: float = 0.0   # arrivals, refused included, over the last
    recent_s: float = 10.0               # ... seconds (the gateway's short window)
    idle_s: float = math.inf             # since the model's last request (inf: never)
    waiting_requests: int = 0            # waiting now for a first replica (cold start)

    @property
    def requests(self) -> float:
        """Requests that arrived in the window, refused ones included."""
        return (self.requests_per_s + self.refused_per_s) * self.window_s

    def offered_load(self, slots: int) -> float:
        """Replicas' worth of work: arrivals times time in a slot, per slot (Erlangs).

        Refused requests count, as they would have been served. Time in a slot, not the
        request count, so one long generation weighs as much as many short ones. Queue
        wait is left out on purpose: a backlog built while a replica loaded drains on its
        own and must not size the model (it does mark the model hot, see the policy)."""
        return self.arrival_rate * self.mean_service_s / max(1, slots)

    @property
    def arrival_rate(self) -> float:
        """Requests/s: the window's, or its last seconds' when they are higher beyond
        Poisson noise (three standard deviations), so a rise counts at once and a few
        lucky seconds do not."""
        rate = self.requests_per_s + self.refused_per_s
        expected, seen = rate * self.recent_s, self.recent_requests_per_s * self.recent_s
        if seen > expected + 3 * math.sqrt(max(expected, 1.0)):
            return self.recent_requests_per_s
        return rate


@dataclass(frozen=True)
class GatewayDemand:
    """One gateway's record: the demand it saw for each model it was asked for."""

    gateway_id: str
    measured_at_unix_s: float
    models: tuple[ModelDemand, ...] = ()
    window_s: float = 0.0  # how long it has measured (up to its window); a model it does
                           # not list had no request in that time


def merged(records: Iterable[GatewayDemand], declared: Iterable[ModelId] = ()
           ) -> dict[ModelId, ModelDemand]:
    """Every gateway's demand for a model as one: rates add up, means are weighted by the
    requests behind them, the window is the shortest any gateway measured (a gateway just
    started makes the whole figure young, so nothing retires on it), idle the least. A
    declared model no gateway lists had no request in the shortest window (no gateway at
    all: nothing is known, and it is left out)."""
    records = list(records)
    by_model: dict[ModelId, list[ModelDemand]] = {}
    for record in records:
        for demand in record.models:
            by_model.setdefault(demand.model_id, []).append(demand)
    found = {model_id: _merge(model_id, parts) for model_id, parts in by_model.items()}
    if records:
        window = min(r.window_s for r in records)
        for model_id in declared:
            found.setdefault(model_id, ModelDemand(model_id, window_s=window))
    return found


def _weighted(parts: list[ModelDemand], value: str) -> float:
    weights = [p.requests_per_s for p in parts]
    total = sum(weights)
    if total <= 0:
        return max(float(getattr(p, value)) for p in parts)
    return sum(float(getattr(p, value)) * w for p, w in zip(parts, weights, strict=True)) / total


def _merge(model_id: ModelId, parts: list[ModelDemand]) -> ModelDemand:
    if len(parts) == 1:
        return parts[0]
    return ModelDemand(
        model_id, window_s=min(p.window_s for p in parts),
        requests_per_s=sum(p.requests_per_s for p in parts),
        refused_per_s=sum(p.refused_per_s for p in parts),
        mean_service_s=_weighted(parts, "mean_service_s"),
        mean_queue_wait_s=_weighted(parts, "mean_queue_wait_s"),
        generated_tokens_per_s=sum(p.generated_tokens_per_s for p in parts),
        recent_requests_per_s=sum(p.recent_requests_per_s for p in parts),
        recent_s=min(p.recent_s for p in parts), idle_s=min(p.idle_s for p in parts),
        waiting_requests=sum(p.waiting_requests for p in parts))


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidRecord(f"demand: {what} must be a finite number >= 0, got {value}")
    return value


def demand_to_pb(record: GatewayDemand) -> mesh_pb2.GatewayDemand:
    return mesh_pb2.GatewayDemand(
        gateway_id=record.gateway_id, measured_at_unix_s=record.measured_at_unix_s,
        window_s=record.window_s, models=[mesh_pb2.ModelDemand(
            model_id=d.model_id, window_s=d.window_s, requests_per_s=d.requests_per_s,
            refused_per_s=d.refused_per_s, mean_service_s=d.mean_service_s,
            mean_queue_wait_s=d.mean_queue_wait_s,
            generated_tokens_per_s=d.generated_tokens_per_s,
            recent_requests_per_s=d.recent_requests_per_s, recent_s=d.recent_s,
            idle_s=d.idle_s if math.isfinite(d.idle_s) else -1.0,
            waiting_requests=d.waiting_requests) for d in record.models])


def _model_from_pb(m: mesh_pb2.ModelDemand) -> ModelDemand:
    if not m.model_id:
        raise InvalidRecord("demand without model_id")
    fields = {name: _finite(getattr(m, name), f"{m.model_id} {name}") for name in (
        "window_s", "requests_per_s", "refused_per_s", "mean_service_s", "mean_queue_wait_s",
        "generated_tokens_per_s", "recent_requests_per_s", "recent_s")}
    idle = math.inf if m.idle_s < 0 else _finite(m.idle_s, f"{m.model_id} idle_s")
    return ModelDemand(ModelId(m.model_id), idle_s=idle, waiting_requests=m.waiting_requests,
                       **fields)


def parse_demand(raw: bytes) -> GatewayDemand:
    message = decode_record(mesh_pb2.GatewayDemand(), raw)
    if not message.gateway_id:
        raise InvalidRecord("demand record without gateway_id")
    return GatewayDemand(message.gateway_id, message.measured_at_unix_s,
                         tuple(_model_from_pb(m) for m in message.models),
                         _finite(message.window_s, "window_s"))

