"""Per-sequence sampling over one row of logits, as pure functions of (logits, spec, history).

The transforms follow llama.cpp's default order (penalties, top-k, top-p, min-p, then
temperature) so that a request means the same here as on llama-server. The draw itself takes
a uniform number from the request's own seeded generator: the same seed and the same logits
give the same token, whatever else shares the batch.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from meshllm.common.types import SamplingParams

Logits = npt.NDArray[np.float32]
# Candidates tried for top-p before falling back to sorting the whole vocabulary.
_TOP_P_STAGES = (64, 1024, 16384)


@dataclass(frozen=True)
class SamplerSpec:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64  # llama-cpp-python's default window
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def plain_logits(self) -> bool:
        """No penalty and no bias: the raw row can be used without a copy."""
        return (self.repeat_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and not self.logit_bias)

    @classmethod
    def from_params(cls, p: SamplingParams, *, default_seed: int | None = None) -> SamplerSpec:
        seed = p.seed if p.seed is not None else default_seed
        if seed is None:
            seed = secrets.randbits(32)
        return cls(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                   repeat_penalty=p.repeat_penalty or 1.0, presence_penalty=p.presence_penalty,
                   frequency_penalty=p.frequency_penalty,
                   logit_bias=tuple(sorted(p.logit_bias)), seed=int(seed))


@dataclass(frozen=True)
class Dist:
    """A distribution over candidate token ids (probabilities sum to 1)."""

    ids: npt.NDArray[np.int64]
    probs: npt.NDArray[np.float64]


def adjust(logits: Logits, spec: SamplerSpec, history: Sequence[int]) -> Logits:
    """Logit bias and repeat/presence/frequency penalties over the last `penalty_last_n`."""
    if spec.plain_logits:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    for token, bias in spec.logit_bias:
        out[token] += bias
    window = history[-spec.penalty_last_n:] if spec.penalty_last_n > 0 else ()
    for token, count in Counter(window).items():
        value = out[token]
        value = value / spec.repeat_penalty if value > 0 else value * spec.repeat_penalty
        out[token] = value - count * spec.frequency_penalty - spec.presence_penalty
    return out


def greedy_choice(logits: Logits, spec: SamplerSpec, history: Sequence[int]) -> int:
    return int(np.argmax(adjust(logits, spec, history)))


def _softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(x - x.max())
    return e / e.sum()  # type: ignore[no-any-return]


def _top_p(ids: npt.NDArray[np.int64], x: npt.NDArray[np.float64],
           top_p: float) -> npt.NDArray[np.int64]:
    """The smallest most-likely set whose mass reaches top_p (at least one token)."""
    p = _softmax(x)
    for n in (*(s for s in _TOP_P_STAGES if s < p.size), p.size):
        top = np.argpartition(-p, n - 1)[:n] if n < p.size else np.arange(p.size)
        top = top[np.argsort(-p[top], kind="stable")]
        mass = np.cumsum(p[top])
        if mass[-1] >= top_p or n == p.size:
            keep = int(np.searchsorted(mass, top_p)) + 1
            return ids[top[:max(1, min(keep, n))]]
    raise AssertionError("unreachable: the last stage covers every candidate")


def distribution(logits: Logits, spec: SamplerSpec, history: Sequence[int]) -> Dist:
    """What the request samples from at this position: one-hot at the argmax when greedy."""
    x = adjust(logits, spec, history)
    if spec.greedy:
        return Dist(np.array([int(np.argmax(x))]), np.array([1.0]))
    ids = np.arange(x.size, dtype=np.int64)
    if 0 < spec.top_k < x.size:
        ids = np.argpartition(-x, spec.top_k - 1)[: spec.top_k].astype(np.int64)
    if spec.top_p < 1.0:
        ids = _top_p(ids, x[ids].astype(np.float64), spec.top_p)
    if spec.min_p > 0.0:
        vals = x[ids]
        ids = ids[vals >= vals.max() + np.log(spec.min_p)]
    return Dist(ids, _softmax(x[ids].astype(np.float64) / spec.temperature))


def draw(dist: Dist, u: float) -> int:
    """Inverse-CDF draw with a uniform u in [0, 1)."""
    cdf = np.cumsum(dist.probs)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(dist.ids[min(i, dist.ids.size - 1)])

