"""Per-key rate limits: requests and tokens per minute over a sliding window.

A pure class over a clock the caller passes in (`now`, in seconds of any monotonic clock),
so that tests drive it with a fake one."""

from __future__ import annotations

from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field

from meshllm.common.errors import MeshError
from meshllm.gateway.auth import ApiKey

WINDOW_S = 60.0


class KeyRateExceeded(MeshError):
    """The key used up its share of the last minute; `retry_after_s` says when it has some
    again."""

    reason = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRateExceeded(KeyRateExceeded):
    reason = "requests_per_minute_exceeded"


class TokenRateExceeded(KeyRateExceeded):
    reason = "tokens_per_minute_exceeded"


class ConcurrencyExceeded(RequestRateExceeded):
    reason = "concurrent_requests_exceeded"


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)          # admission times
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)
    token_total: int = 0                                            # sum over `tokens`

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_total -= self.tokens.popleft()[1]


class KeyLimiter:
    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._in_flight: dict[str, int] = {}   # of keys with a `concurrent` limit

    def admit(self, key: ApiKey, now: float) -> None:
        """Count a request of `key` at `now`, or raise KeyRateExceeded (counting nothing).
        An admitted request must be `release`d when it ends."""
        in_flight = self._in_flight.get(key.name, 0)
        if key.concurrent and in_flight >= key.concurrent:
            raise ConcurrencyExceeded(
                f"API key {key.name!r} has {key.concurrent} requests in flight already.", 1.0)
        if key.requests_per_minute or key.tokens_per_minute:
            self._admit_rate(key, now)
        if key.concurrent:
            self._in_flight[key.name] = in_flight + 1

    def release(self, key: ApiKey) -> None:
        if key.name in self._in_flight:
            self._in_flight[key.name] -= 1
            if not self._in_flight[key.name]:
                del self._in_flight[key.name]

    def _admit_rate(self, key: ApiKey, now: float) -> None:
        usage = self._usage.setdefault(key.name, _Usage())
        usage.expire(now)
        if key.tokens_per_minute and usage.token_total >= key.tokens_per_minute:
            raise TokenRateExceeded(
                f"Rate limit reached for API key {key.name!r}: {key.tokens_per_minute} "
                "tokens per minute.", _tokens_free_at(usage, key.tokens_per_minute) - now)
        if key.requests_per_minute and len(usage.requests) >= key.requests_per_minute:
            raise RequestRateExceeded(
                f"Rate limit reached for API key {key.name!r}: {key.requests_per_minute} "
                "requests per minute.", usage.requests[0] + WINDOW_S - now)
        usage.requests.append(now)

    def charge(self, key: ApiKey, tokens: int, now: float) -> None:
        """Count the tokens a finished request of `key` used (known only once it ends)."""
        if not key.tokens_per_minute or tokens <= 0:
            return
        usage = self._usage.setdefault(key.name, _Usage())
        usage.expire(now)
        usage.tokens.append((now, tokens))
        usage.token_total += tokens


def _tokens_free_at(usage: _Usage, limit: int) -> float:
    """When enough of the window's tokens have expired for the total to fall below limit."""
    total = usage.token_total
    for at, tokens in usage.tokens:
        total -= tokens
        if total < limit:
            return at + WINDOW_S
    return usage.tokens[-1][0] + WINDOW_S


class TokenMeter:
    """Where the request being served counts its tokens: set per request by the gate, read
    by the request accounting (`charge_tokens`) without either knowing the other."""

    def __init__(self) -> None:
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens


CURRENT_METER: ContextVar[TokenMeter | None] = ContextVar("meshllm_token_meter", default=None)


def charge_tokens(tokens: int) -> None:
    """Count `tokens` against the current request's key (nothing outside a keyed request)."""
    meter = CURRENT_METER.get()
    if meter is not None:
        meter.add(tokens)
