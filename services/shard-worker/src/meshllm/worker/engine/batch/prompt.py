"""Text or chat messages -> prompt tokens and template stop strings, without a `Llama`.

Chat messages go through the model's (or its family's) template from `chat`; the BOS token
is added unless the rendered prompt already starts with it.
"""

from __future__ import annotations

import logging

from meshllm.common.types import ChatMessage
from meshllm.worker.engine.batch.backend import LlamaBackend
from meshllm.worker.engine.batch.chat import ChatTemplate, choose_template, render_chat

log = logging.getLogger(__name__)


class PromptBuilder:
    def __init__(self, backend: LlamaBackend, override: str = "") -> None:
        """`override`: the model's ModelSpec.chat_template ("" for automatic)."""
        self._b = backend
        self._template: ChatTemplate
        self._template, origin = choose_template(
            override, backend.meta("tokenizer.chat_template"),
            backend.meta("general.architecture") or "")
        log.info("chat template: %s", origin)
        self._bos, self._eos = backend.special_piece("bos"), backend.special_piece("eos")

    def prompt_tokens(self, text: str | None, chat: tuple[ChatMessage, ...] | None,
                      tools_json: str = "") -> tuple[list[int], tuple[str, ...]]:
        """`tools_json`: the request's tools (a JSON list) to render into a chat prompt."""
        if chat is not None:
            prompt = render_chat(self._template, chat, self._bos, self._eos, tools_json)
            stops = self._template.stop
        else:
            prompt, stops = text or "", ()
        add_bos = not (self._bos and prompt.startswith(self._bos))
        return self._b.tokenize(prompt, add_bos), stops
