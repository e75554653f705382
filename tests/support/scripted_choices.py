"""A gateway backend that plays a script of choice events (or raises an error from it),
for tests of the HTTP layer with no mesh behind it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import cast

from meshllm.common.store import KeyValueStore
from meshllm.common.types import GenerateEvent
from meshllm.gateway.backend import MeshBackend
from meshllm.gateway.choices import Traced
from meshllm.gateway.config import StreamTiming
from meshllm.gateway.openai_api import ApiRequest

Script = Sequence[tuple[int, GenerateEvent] | Exception]


class ScriptedChoices(MeshBackend):
    def __init__(self, script: Script) -> None:
        super().__init__(cast(KeyValueStore, object()), StreamTiming(1.0, 1.0))
        self.script = script
        self.requests: list[ApiRequest] = []

    async def generate_choices(self, req: ApiRequest, trace: Traced = lambda e: e
                               ) -> AsyncGenerator[tuple[int, GenerateEvent], None]:
        self.requests.append(req)
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item
