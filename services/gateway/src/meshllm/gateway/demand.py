"""Demand per model as this gateway sees it (`DemandMeter`, pure on an injected clock), and
its publication under a lease in etcd (`DemandPublisher`) for the planner to size models by.

Counts go into one bucket per second per model, so memory is bounded by the window, not by
the request rate; a figure is off by at most the one second at the window's old edge."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field

from meshllm.common import store
from meshllm.common.demand import (
    GatewayDemand,
    ModelDemand,
    demand_to_pb,
    merged,
)
from meshllm.common.membership import LeaseConfig, Registration
from meshllm.common.types import ModelId

log = logging.getLogger(__name__)

Clock = Callable[[], float]
DEFAULT_LEASE = LeaseConfig()


@dataclass
class _Bucket:
    second: int
    arrivals: int = 0
    admitted: int = 0
    refused: int = 0
    service_s: float = 0.0
    queued_s: float = 0.0
    tokens: int = 0


@dataclass
class _Model:
    buckets: collections.deque[_Bucket] = field(default_factory=collections.deque)
    last_arrival: float | None = None
    waiting: int = 0


class DemandMeter:
    """Records what happens to each model's requests; `snapshot` sums the window."""

    def __init__(self, clock: Clock = time.monotonic, window_s: float = 60.0,
                 recent_s: float = 10.0) -> None:
        self.clock = clock
        self.window_s = window_s
        self.recent_s = min(recent_s, window_s)
        self._started = clock()
        self._models: dict[ModelId, _Model] = {}

    def _bucket(self, model_id: ModelId) -> _Bucket:
        now = self.clock()
        model = self._models.setdefault(model_id, _Model())
        second = math.floor(now)
        if not model.buckets or model.buckets[-1].second != second:
            model.buckets.append(_Bucket(second))
        self._trim(model, now)
        return model.buckets[-1]

    def _trim(self, model: _Model, now: float) -> None:
        while model.buckets and model.buckets[0].second <= now - self.window_s:
            model.buckets.popleft()

    def arrived(self, model_id: ModelId, count: int = 1) -> None:
        """`count` requests (choices) for the model arrived, whatever becomes of them."""
        self._bucket(model_id).arrivals += count
        self._models[model_id].last_arrival = self.clock()

    def admitted(self, model_id: ModelId, queued_s: float, service_s: float,
                 generated_tokens: int = 0) -> None:
        """One admitted request ended: its wait for a slot, its time in one, its tokens."""
        bucket = self._bucket(model_id)
        bucket.admitted += 1
        bucket.queued_s += max(0.0, queued_s)
        bucket.service_s += max(0.0, service_s)
        bucket.tokens += max(0, generated_tokens)

    def refused(self, model_id: ModelId, count: int = 1) -> None:
        """Requests answered 429 (every replica busy) or 503 (no replica)."""
        self._bucket(model_id).refused += count

    @contextlib.contextmanager
    def waiting(self, model_id: ModelId) -> Iterator[None]:
        """Around a request's wait for a first replica (a cold start)."""
        model = self._models.setdefault(model_id, _Model())
        model.waiting += 1
        try:
            yield
        finally:
            model.waiting -= 1

    def measured_s(self, now: float) -> float:
        """How long the figures cover: the window, or the uptime while it is shorter."""
        return min(self.window_s, max(now - self._started, 1.0))

    def snapshot(self, now: float | None = None,
                 keep: Collection[ModelId] | None = None) -> tuple[ModelDemand, ...]:
        """Each model's demand over the window (the uptime while it is shorter). A model
        without activity in the window nor a waiting request is still reported, with its
        idle_s, while it is in `keep` (the declared models; None: all); else forgotten."""
        now = self.clock() if now is None else now
        window = self.measured_s(now)
        recent = min(self.recent_s, window)
        out = []
        for model_id in sorted(self._models):
            model = self._models[model_id]
            self._trim(model, now)
            if not model.buckets and not model.waiting:
                if keep is not None and model_id not in keep:
                    del self._models[model_id]
                    continue
                if model.last_arrival is None:
                    continue
            out.append(_demand(model_id, model, now, window, recent))
        return tuple(out)


def _demand(model_id: ModelId, model: _Model, now: float, window: float, recent: float
            ) -> ModelDemand:
    buckets = model.buckets
    admitted = sum(b.admitted for b in buckets)
    recent_arrivals = sum(b.arrivals for b in buckets if b.second > now - recent)
    idle = math.inf if model.last_arrival is None else max(0.0, now - model.last_arrival)
    return ModelDemand(
        model_id, window_s=window, requests_per_s=admitted / window,
        refused_per_s=sum(b.refused for b in buckets) / window,
        mean_service_s=sum(b.service_s for b in buckets) / admitted if admitted else 0.0,
        mean_queue_wait_s=sum(b.queued_s for b in buckets) / admitted if admitted else 0.0,
        generated_tokens_per_s=sum(b.tokens for b in buckets) / window,
        recent_requests_per_s=recent_arrivals / recent, recent_s=recent, idle_s=idle,
        waiting_requests=model.waiting)


def _close(a: float, b: float, rel: float = 0.1, abs_: float = 1e-3) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


RATES = ("window_s", "requests_per_s", "refused_per_s", "mean_service_s",
         "mean_queue_wait_s", "generated_tokens_per_s", "recent_requests_per_s", "idle_s")


def changed(old: tuple[ModelDemand, ...], new: tuple[ModelDemand, ...]) -> bool:
    """Whether `new` says something the planner would act on that `old` did not: another
    set of models or waiting counts, or a figure off by more than 10% (idle_s included,
    so a cold model's idle time is rewritten at ever longer intervals)."""
    if [d.model_id for d in old] != [d.model_id for d in new]:
        return True
    return any(a.waiting_requests != b.waiting_requests
               or any(not _close(getattr(a, f), getattr(b, f)) for f in RATES)
               for a, b in zip(old, new, strict=True))


class DemandPublisher:
    """Every `publish_s`, this gateway's demand under store.DEMAND + gateway_id, on a lease
    so that the record goes with the gateway. A tick writes only when the figures changed
    (see `changed`) or the last write is `refresh_s` old; so at most one write each
    publish_s. The other gateways' records are read at each tick too, for the status."""

    def __init__(self, kv: store.KeyValueStore, meter: DemandMeter, gateway_id: str,
                 declared: Callable[[], Collection[ModelId]],
                 published: Callable[[], Mapping[str, GatewayDemand]] = dict,
                 publish_s: float = 5.0,
                 lease: LeaseConfig = DEFAULT_LEASE, refresh_s: float = 60.0,
                 wall_clock: Clock = time.time) -> None:
        self.meter = meter
        self.gateway_id = gateway_id
        self._kv = kv
        self._declared = declared
        self._published = published  # every gateway's record, as the mesh view holds them
        self._publish_s = publish_s
        self._refresh_s = max(refresh_s, publish_s)
        self._wall = wall_clock
        self._registration = Registration(kv, store.DEMAND + gateway_id, lease)
        self._last: tuple[ModelDemand, ...] | None = None
        self._last_at = -math.inf
        self.writes = 0

    @property
    def key(self) -> str:
        return self._registration.key

    async def tick(self) -> bool:
        """One round; whether it wrote."""
        models = self.meter.snapshot(keep=self._declared())
        now = self.meter.clock()
        due = now - self._last_at >= self._refresh_s
        wrote = False
        if self._last is None or due or changed(self._last, models):
            await self._registration.publish(
                demand_to_pb(self._record(models, now)).SerializeToString())
            self._last, self._last_at, wrote = models, now, True
            self.writes += 1
        return wrote

    def _record(self, models: tuple[ModelDemand, ...], now: float) -> GatewayDemand:
        return GatewayDemand(self.gateway_id, self._wall(), models,
                             self.meter.measured_s(now))

    def mesh_demand(self) -> tuple[GatewayDemand, ...]:
        """Every gateway's demand: this one's live, the others' as the mesh view last
        saw their records."""
        now = self.meter.clock()
        own = self._record(self.meter.snapshot(now, keep=self._declared()), now)
        others = [r for gateway_id, r in self._published().items()
                  if gateway_id != self.gateway_id]
        return (own, *others)

    def mesh_view(self) -> dict[ModelId, ModelDemand]:
        """Per model, merged over every gateway (for the status and the console)."""
        return merged(self.mesh_demand())

    async def run(self) -> None:
        """Publish until cancelled, then withdraw the record (revoke its lease)."""
        keep_alive = asyncio.create_task(self._registration.keep_alive())
        try:
            while True:
                try:
                    await self.tick()
                except Exception as exc:  # a failed round must not end the gateway
                    log.warning("demand publication failed: %s", exc)
                await asyncio.sleep(self._publish_s)
        finally:
            keep_alive.cancel()
            with contextlib.suppress(Exception):
                await self._registration.withdraw()
