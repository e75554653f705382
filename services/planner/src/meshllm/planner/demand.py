"""What rebalancing decides over and what it answers with: the declared models, the
workers, the replicas they hold now, the knobs, and the moves.

The demand the gateways publish is `meshllm.common.demand.ModelDemand` (it crosses the
wire); the declarations `POST /api/models` writes are `types.ModelDeclaration`, and a
`SizedModel` is one of them with what a replica of it takes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshllm.common.demand import ModelDemand as ModelDemand
from meshllm.common.errors import ConfigError
from meshllm.common.types import ModelId, WorkerId


@dataclass(frozen=True)
class SizedModel:
    """A declared model (types.ModelDeclaration) as rebalancing sizes it."""

    model_id: ModelId
    replica_bytes: int               # memory one whole replica takes (place.required_bytes)
    min_replicas: int = 0            # kept whatever the demand
    max_replicas: int | None = None  # None: as many as demand and memory allow
    priority: int = 0                # higher is served first and may take memory from lower
    slots: int = 1                   # sequences one replica generates at once

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or (self.max_replicas is not None
                                     and self.max_replicas < self.min_replicas):
            raise ConfigError(f"{self.model_id} min_replicas/max_replicas",
                              f"need 0 <= min <= max, got {self.min_replicas} and "
                              f"{self.max_replicas}")


@dataclass(frozen=True)
class WorkerCapacity:
    worker_id: WorkerId
    free_bytes: int        # its budget less every replica it holds (loading, ready, retiring)
    max_models: int = 0    # replicas it may hold at once (they share its compute); 0: no limit
    leaving: bool = False  # draining to go: counts as gone


class ReplicaPhase(enum.Enum):
    LOADING = "loading"    # takes no traffic until ready
    READY = "ready"
    RETIRING = "retiring"  # takes no new requests, drains its streams, then unloads


@dataclass(frozen=True)
class HeldReplica:
    model_id: ModelId
    worker_id: WorkerId
    phase: ReplicaPhase
    since_s: float  # when it entered its phase, on the planner's clock (seconds)


@dataclass(frozen=True)
class CurrentAssignment:
    now_s: float                                 # the planner's clock (seconds)
    replicas: tuple[HeldReplica, ...] = ()
    last_grew_s: Mapping[ModelId, float] = field(default_factory=dict)    # last add, per model
    last_shrank_s: Mapping[ModelId, float] = field(default_factory=dict)  # last retire


@dataclass(frozen=True)
class RebalancePolicy:
    """Utilization is offered load per ready replica (1.0: every slot busy all the time).
    A model is sized to `target` whenever it grows or shrinks, which sits between the two
    thresholds, so a move never lands a model on the far side of either."""

    add_above: float = 0.8          # utilization over which a model gets replicas
    target: float = 0.6             # utilization a model is sized to when it moves
    retire_below: float = 0.25      # utilization under which a model may lose replicas
    max_queue_wait_s: float = 2.0   # a mean queue wait over this counts as hot while
                                    # utilization is over target (else it is a backlog
                                    # draining on capacity that came up already)
    min_requests: float = 10.0      # requests in the window before load counts as hot
                                    # (one is enough for a model with no replica)
    min_window_s: float = 30.0      # a model measured over less (a gateway just started)
                                    # loses no replica, retired or evicted
    idle_to_zero_s: float = 600.0   # with retire_cold_early: a model without a request
                                    # this long goes to zero replicas
    min_age_s: float = 300.0        # a replica stays this long before it may retire
    cooldown_s: float = 120.0       # before a model that grew may shrink, or the reverse
                                    # (a model with no replica is exempt)
    retire_cold_early: bool = False  # False: a cold model's surplus stays loaded until
                                     # another model needs the memory; True: retired at once

    def __post_init__(self) -> None:
        if not 0 < self.retire_below < self.target < self.add_above:
            raise ConfigError("rebalance thresholds",
                              "need 0 < retire_below < target < add_above, got "
                              f"{self.retire_below}, {self.target}, {self.add_above}")

    def sized(self, load: float) -> int:
        """Replicas that carry `load` at the target utilization."""
        return math.ceil(load / self.target - 1e-9) if load > 0 else 0


@dataclass(frozen=True)
class AddReplica:
    model_id: ModelId
    worker_id: WorkerId
    reason: str
    after: tuple[ModelId, ...] = ()  # replicas on that worker that must unload first


@dataclass(frozen=True)
class RetireReplica:
    model_id: ModelId
    worker_id: WorkerId
    reason: str


@dataclass(frozen=True)
class Blocked:
    """A model that wanted a move and did not get it (or not all of it)."""

    model_id: ModelId
    reason: str


@dataclass(frozen=True)
class Moves:
    adds: tuple[AddReplica, ...] = ()
    retires: tuple[RetireReplica, ...] = ()
    blocked: tuple[Blocked, ...] = ()

    @property
    def count(self) -> int:
        return len(self.adds) + len(self.retires)

    def blocked_reason(self, model_id: ModelId) -> str:
        return "; ".join(b.reason for b in self.blocked if b.model_id == model_id)
