"""A streamed Responses API answer: the worker's events through the chat stream (which
reads tool calls out of the text), then as Responses events. The stream always ends with
response.completed, response.incomplete or response.failed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

from meshllm.common.errors import MeshError
from meshllm.common.types import GenerateEvent, TokenDelta
from meshllm.gateway.errors import api_error_for
from meshllm.gateway.failures import IncompleteAnswer
from meshllm.gateway.metrics import RequestTimer
from meshllm.gateway.responses_events import ResponseEvents, ResponseHead, sse_event
from meshllm.gateway.streaming import ChoiceStream

log = logging.getLogger(__name__)
Choice = tuple[int, GenerateEvent]


def _sse(events: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(sse_event(e) for e in events)


async def response_stream(head: ResponseHead, events: AsyncIterator[Choice],
                          choices: AsyncGenerator[Choice, None], timer: RequestTimer
                          ) -> AsyncIterator[bytes]:
    """`events`: the request's one choice from its first event on; `choices`: the
    generator under them, closed at the end (which cancels the worker call)."""
    outcome, finished = "cancelled", False
    chat = ChoiceStream(head.req.chat, 0)
    out = ResponseEvents(head)
    try:
        yield _sse(out.opening())
        async for _, event in events:
            if isinstance(event, TokenDelta):
                timer.tokens(event.tokens)
                if data := _sse(e for c in chat.delta(event) for e in out.choice(c)):
                    yield data  # nothing while text may be the start of a call
                continue
            timer.finished(event)
            finished = True
            yield _sse([*(e for c in chat.finish(event) for e in out.choice(c)),
                        *out.finish(event.finish_reason, event.usage, int(time.time()))])
        if not finished:
            raise IncompleteAnswer("the worker ended the stream without a finish reason")
        outcome = "ok"
    except MeshError as exc:
        outcome = "error"
        log.warning("response stream %s ended with an error: %s", head.response_id, exc)
        yield _sse(out.failed(api_error_for(exc)))
    finally:
        timer.done(outcome)
        await choices.aclose()  # cancels the worker call if the client went away
