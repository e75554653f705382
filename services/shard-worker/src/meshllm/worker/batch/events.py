"""What the engine reports to the caller, one callback per event, from the engine thread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Delta:
    """Text produced since the last delta; `text` may be empty while a stop string is held."""

    request_id: str
    text: str
    tokens: int
    token_ids: tuple[int, ...] = ()  # the tokens behind `text` (tests compare outputs by them)


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV was reused, not re-processed
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    request_id: str
    kind: str  # the error's class name, as engine_proc reports errors
    message: str


Event = Delta | Finished | Failed
OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class EngineStats:
    running: int
    queued: int
    max_queue: int
    n_slots: int
    steps: int  # llama_decode calls on the target model
    seq_steps: int  # (sequence, decode call) pairs that produced tokens
    generated_tokens: int
    prompt_tokens_processed: int
    prompt_tokens_cached: int
    drafted_tokens: int
    accepted_tokens: int

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per sequence per target decode: 1.0 without speculation."""
        return self.generated_tokens / self.seq_steps if self.seq_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0
