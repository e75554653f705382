"""What the gateway learned about each worker: its calls in flight and, after failures, a
ban with exponential backoff that ends in a probe (a circuit breaker's half-open state).

A frozen record per worker, updated by pure functions: the backend keeps the records and
calls these at each dispatch, verdict and return."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

BAN_BASE_S = 1.0   # the first failure bans a worker this long
BAN_MAX_S = 60.0   # doubling per consecutive failure stops here
NEVER = -1e9       # a monotonic time long past


class Health(enum.Enum):
    HEALTHY = "healthy"  # no failure since its last success
    PROBE = "probe"      # its ban ran out: the next request to it is the probe
    BANNED = "banned"    # banned, or its probe is still running: tried after the others


@dataclass(frozen=True)
class WorkerLoad:
    in_flight: int = 0                # requests this gateway has open on the worker
    last_failure_at_s: float = NEVER  # monotonic time of the last failed call
    strikes: int = 0                  # failures since the last success
    banned_until_s: float = NEVER     # monotonic time its ban ends
    probing: bool = False             # a probe is in flight: no second one until it ends


def ban_s(strikes: int) -> float:
    """How long a worker is banned after `strikes` consecutive failures (1 s, 2 s, 4 s...)."""
    if strikes <= 0:
        return 0.0
    return min(BAN_BASE_S * 2.0 ** min(strikes - 1, 30), BAN_MAX_S)


def on_failure(state: WorkerLoad, now_s: float) -> WorkerLoad:
    """A call failed: one more strike, and a ban twice as long as the last one."""
    strikes = state.strikes + 1
    return replace(state, last_failure_at_s=now_s, strikes=strikes,
                   banned_until_s=now_s + ban_s(strikes))


def on_success(state: WorkerLoad, now_s: float) -> WorkerLoad:
    """The worker answered: the ban and its backoff are forgotten. `now_s` is unused
    today; it keeps the signature of `on_failure` for callers and future decay rules."""
    del now_s
    return replace(state, strikes=0, banned_until_s=NEVER, probing=False)


def health(state: WorkerLoad, now_s: float) -> Health:
    if state.strikes == 0:
        return Health.HEALTHY
    if now_s < state.banned_until_s or state.probing:
        return Health.BANNED
    return Health.PROBE


def on_dispatch(state: WorkerLoad, now_s: float) -> tuple[WorkerLoad, bool]:
    """A call starts on the worker; whether it is the worker's probe (sent after its ban
    ran out: the one request let through until its outcome is known)."""
    probe = health(state, now_s) is Health.PROBE
    return replace(state, in_flight=state.in_flight + 1,
                   probing=state.probing or probe), probe


def on_return(state: WorkerLoad, probe: bool) -> WorkerLoad:
    """A call ended, with or without a verdict. A probe that ended without one (the
    client left, the worker was busy) lets the next request probe again."""
    return replace(state, in_flight=max(0, state.in_flight - 1),
                   probing=state.probing and not probe)
