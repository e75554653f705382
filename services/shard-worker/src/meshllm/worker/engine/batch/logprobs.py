"""Log probabilities of generated tokens, and their release in step with streamed text.

A token's logprob comes from log_softmax of the logits after logit bias, penalties and the
grammar mask, before temperature and top-k/top-p/min-p (as vLLM's processed logprobs): a
greedy choice is therefore always the most likely entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt
from meshllm.common.types import TokenLogprob, TopLogprob
from meshllm.worker.engine.batch.grammar import Mask
from meshllm.worker.engine.batch.sampling import Logits, SamplerSpec, adjust

MAX_TOP_LOGPROBS = 20
T = TypeVar("T")


def token_text(data: bytes) -> str:
    """A token's text; a piece of a UTF-8 character shows its bytes as \\xNN escapes."""
    return data.decode("utf-8", "backslashreplace")


def _top(values: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
    """Indices of the n largest values, largest first, ties by lower index (the token
    np.argmax, i.e. a greedy choice, would take comes first)."""
    k = min(n, values.size)
    threshold = np.partition(values, values.size - k)[values.size - k]
    tied = np.flatnonzero(values >= threshold)  # every tie at the threshold, not just some
    return tied[np.lexsort((tied, -values[tied]))][:k]


def logprob_entry(logits: Logits, spec: SamplerSpec, history: Sequence[int],
                  mask: Mask | None, token: int, n_top: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """The chosen token's logprob and the n_top most likely tokens (forbidden ones never).
    Only the allowed tokens' logits are read: O(vocabulary) once, in float32."""
    x = adjust(logits, spec, history)
    ids = None if mask is None else np.flatnonzero(mask)
    values = x if ids is None else x[ids]
    best = float(values.max())
    lse = best + math.log(float(np.exp(values - best).sum(dtype=np.float64)))
    top: tuple[TopLogprob, ...] = ()
    if n_top > 0:
        order = _top(values, n_top)
        chosen = order if ids is None else ids[order]
        top = tuple(TopLogprob(token_text(piece(int(t))), piece(int(t)), float(v) - lse)
                    for t, v in zip(chosen.tolist(), values[order].tolist(), strict=True)
                    if math.isfinite(v))
    data = piece(token)
    return TokenLogprob(token_text(data), data, float(x[token]) - lse, top)


class TextRelease(Generic[T]):
    """Hands out what belongs to tokens (their logprobs, their ids) as their text is sent:
    text held back (a possible stop string) holds its tokens' items too, in order. A token
    goes once some of its text has gone (a token with no text of its own goes with the text
    after it); tokens whose text a stop string swallowed are dropped with it."""

    def __init__(self) -> None:
        self._held: list[tuple[int, T]] = []  # (offset of the token's text, item)
        self._fed = 0      # characters of text produced
        self._released = 0  # characters of it sent

    def add(self, item: T, text_chars: int) -> None:
        self._held.append((self._fed, item))
        self._fed += text_chars

    def release(self, sent_chars: int) -> tuple[T, ...]:
        self._released += sent_chars
        n = next((i for i, (start, _) in enumerate(self._held) if start >= self._released),
                 len(self._held))
        out = tuple(e for _, e in self._held[:n])
        del self._held[:n]
        return out

    def flush(self) -> tuple[T, ...]:
        out = tuple(e for _, e in self._held)
        self._held.clear()
        return out

    def drop(self) -> None:
        self._held.clear()
