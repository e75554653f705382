"""The token loop inside the engine process: prompt -> tokens -> text deltas.

Runs llama-cpp-python's `Llama` one request at a time; the service around it queues.
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from meshllm.common.errors import PromptTooLong
from meshllm.common.types import ChatMessage, SamplingParams
from meshllm.worker.chat import ChatTemplate, render_chat, template_for
from meshllm.worker.stops import StopMatcher

# emit(text, tokens): text may be empty while a possible stop string is held back.
Emit = Callable[[str, int], None]


@dataclass(frozen=True)
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Generator:
    """Wraps a loaded `Llama` with chat rendering, limits, stop strings and UTF-8 safety."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self.n_ctx: int = int(llm.n_ctx())
        meta = getattr(llm, "metadata", {}) or {}
        self._template: ChatTemplate = template_for(
            meta.get("tokenizer.chat_template"), meta.get("general.architecture", "")
        )
        self._bos = self._piece(llm.token_bos())
        self._eos = self._piece(llm.token_eos())

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._llm.detokenize([token], special=True)).decode("utf-8", "replace")

    def prompt_tokens(self, text: str | None, chat: tuple[ChatMessage, ...] | None
                      ) -> tuple[list[int], tuple[str, ...]]:
        if chat is not None:
            prompt = render_chat(self._template, chat, self._bos, self._eos)
            stops = self._template.stop
        else:
            prompt, stops = text or "", ()
        add_bos = not (self._bos and prompt.startswith(self._bos))
        tokens = list(self._llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True))
        if len(tokens) >= self.n_ctx:
            raise PromptTooLong(len(tokens), self.n_ctx)
        return tokens, stops

    def run(self, tokens: list[int], extra_stops: tuple[str, ...], sampling: SamplingParams,
            emit: Emit, cancelled: Callable[[], bool]) -> Outcome:
        budget = self.n_ctx - len(tokens)
        limit = min(sampling.max_tokens or budget, budget)
        self._llm.set_seed((sampling.seed if sampling.seed is not None else secrets.randbits(32))
                           & 0xFFFFFFFF)
        # Re-using a cached prefix evaluates the prompt in different batches, which changes
        # the logits in the last bits: a seeded sample would then depend on the previous
        # request. Until prefix reuse is made exact, every request starts from a clean cache.
        self._llm.reset()
        matcher = StopMatcher((*sampling.stop, *extra_stops))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced, reason, history = 0, "length", list(tokens)
        for token in self._tokens(tokens, sampling):
            if self._is_eog(token):
                reason = "stop"
                break
            produced += 1
            piece = decoder.decode(self._llm.detokenize([token], prev_tokens=history))
            history.append(token)
            text, stopped = matcher.feed(piece)
            emit(text, 1)
            if stopped:
                return Outcome("stop", len(tokens), produced)
            if produced >= limit or cancelled():
                break
        tail = matcher.flush() + decoder.decode(b"", final=True)
        if tail:
            emit(tail, 0)
        return Outcome(reason, len(tokens), produced)

    def _is_eog(self, token: int) -> bool:
        import llama_cpp  # the engine process has it; the service process imports this lazily

        return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    def _tokens(self, tokens: list[int], s: SamplingParams) -> Iterator[int]:
        return iter(self._llm.generate(
            tokens, top_k=s.top_k, top_p=s.top_p, min_p=0.0, typical_p=1.0,
            temp=s.temperature, repeat_penalty=s.repeat_penalty or 1.0,
            frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
        ))
