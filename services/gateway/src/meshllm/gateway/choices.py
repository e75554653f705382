"""n choices of one API request: the worker request of each, their events merged into
one stream, and what each collected (for the non-streamed answer)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from meshllm.common.types import (
    Finished,
    GenerateEvent,
    GenerateRequest,
    ModelId,
    RequestId,
    TokenDelta,
    TokenLogprob,
    Usage,
)
from meshllm.gateway.openai_api import ApiRequest

Traced = Callable[[AsyncGenerator[GenerateEvent, None]], AsyncGenerator[GenerateEvent, None]]
_SEED_SPACE = 1 << 64


def generate_request(req: ApiRequest, model_id: ModelId, index: int) -> GenerateRequest:
    """The worker request of choice `index`: a seeded request gets seed + index, so the
    choices differ and the whole answer is still reproducible."""
    sampling = req.sampling
    if sampling.seed is not None and index:
        sampling = replace(sampling, seed=(sampling.seed + index) % _SEED_SPACE)
    return GenerateRequest(RequestId(uuid.uuid4().hex), model_id, req.text, req.chat,
                           sampling, grammar=req.grammar, logprobs=req.logprobs,
                           tools_json=req.tools_json)


async def merged(streams: Sequence[AsyncGenerator[GenerateEvent, None]]
                 ) -> AsyncGenerator[tuple[int, GenerateEvent], None]:
    """The streams' events as (stream index, event) in the order they arrive. The first
    error of any stream ends the whole (the others are cancelled) and is raised here."""
    queue: asyncio.Queue[tuple[int, GenerateEvent | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[GenerateEvent, None]) -> None:
        try:
            async with aclosing(stream) as events:
                async for event in events:
                    await queue.put((index, event))
            await queue.put((index, None))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceOutput:
    """What one choice produced, collected for the non-streamed answer."""

    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, event: GenerateEvent) -> None:
        if isinstance(event, TokenDelta):
            self.pieces.append(event.text)
            self.logprobs.extend(event.logprobs)
        else:
            self.finished = event


def total_usage(usages: Sequence[Usage]) -> Usage:
    """The usage of n choices of one prompt: the prompt counted once, as OpenAI does."""
    return Usage(max(u.prompt_tokens for u in usages),
                 sum(u.completion_tokens for u in usages),
                 max(u.cached_tokens for u in usages))
