"""The last requests the gateway answered, as records: what the console lists.

Records come from the gateway's own request accounting (`metrics.RequestTimer`), not from
tracing, so the list is the same whether or not spans are sampled.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

RECENT_REQUESTS = 50


@dataclass(frozen=True)
class RequestRecord:
    at_unix_s: float          # when the request ended
    request_id: str           # the id the client got (chatcmpl-..., cmpl-...)
    model: str
    operation: str            # GenAI operation name: chat, text_completion
    outcome: str              # ok, error, rejected, cancelled
    finish_reason: str        # empty when the worker sent none
    input_tokens: int
    output_tokens: int
    duration_s: float
    ttft_s: float | None      # None: no token came
    trace_id: str             # 32 hex digits; empty when the request had no sampled span


class RecentRequests:
    """The newest records, at most `size` (all on the event loop: no lock)."""

    def __init__(self, size: int = RECENT_REQUESTS) -> None:
        self._records: collections.deque[RequestRecord] = collections.deque(maxlen=size)

    def add(self, record: RequestRecord) -> None:
        self._records.append(record)

    def latest(self) -> list[RequestRecord]:
        """Newest first."""
        return list(reversed(self._records))
