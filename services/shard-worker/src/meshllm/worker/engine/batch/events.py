"""What the engine reports to the caller, one callback per event, from the engine thread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshllm.common.errors import MeshError
from meshllm.common.types import TokenLogprob
from meshllm.worker.engine_wire import EngineStats

__all__ = ["Delta", "EngineStats", "Event", "Failed", "Finished", "OnEvent"]


@dataclass(frozen=True)
class Delta:
    """Text produced since the last delta; `text` may be empty while a stop string is held."""

    request_id: str
    text: str
    tokens: int
    token_ids: tuple[int, ...] = ()  # the tokens behind `text` (tests compare outputs by them)
    # When asked: the logprobs of the tokens whose text this delta sends, in order (text held
    # back for a possible stop string holds its tokens' logprobs until it is sent).
    logprobs: tuple[TokenLogprob, ...] = ()
    # The tokens whose text started to be sent with this delta (its text, or an earlier
    # delta's held text now released) and the generator's draws once the last was chosen.
    sent_ids: tuple[int, ...] = ()
    draws: int = 0


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
    error: MeshError  # crosses the engine pipe as its reason code (engine_wire.WireError)


Event = Delta | Finished | Failed
OnEvent = Callable[[Event], None]
