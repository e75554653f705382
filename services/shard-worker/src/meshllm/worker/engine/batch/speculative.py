"""The acceptance rule of speculative decoding, as pure functions.

Greedy: a drafted token is kept only while it equals the target's own argmax, and the
first disagreement is replaced by the target's choice, so the output is exactly what the
target alone would pick from the same logits. Sampled: standard speculative sampling
(accept x with probability min(1, p(x)/q(x)), else draw from norm(max(p - q, 0))), which
leaves the output distributed as the target's p. Our drafters are deterministic (q is
one-hot at the drafted token), which is the case q=None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from meshllm.worker.engine.batch.sampling import Dist, draw


@dataclass(frozen=True)
class Verdict:
    accepted: int  # drafted tokens kept
    tokens: tuple[int, ...]  # what to emit: the kept drafts, then one token of the target


def accept_greedy(draft: Sequence[int], choice: Callable[[int], int]) -> Verdict:
    """`choice(i)`: the target's argmax after the history plus draft[:i]."""
    for i, token in enumerate(draft):
        target = choice(i)
        if target != token:
            return Verdict(i, (*draft[:i], target))
    return Verdict(len(draft), (*draft, choice(len(draft))))


def accept_probability(p: Dist, q: Dist | None, token: int) -> float:
    px = p.prob(token)
    qx = 1.0 if q is None else q.prob(token)
    return 1.0 if qx <= 0.0 else min(1.0, px / qx)


def residual(p: Dist, q: Dist | None, token: int) -> Dist:
    """norm(max(p - q, 0)); for a one-hot q that is p without the drafted token."""
    probs = p.probs.copy()
    if q is None:
        probs[p.ids == token] = 0.0
    else:
        lookup = dict(zip(q.ids.tolist(), q.probs.tolist(), strict=True))
        probs = np.maximum(probs - np.array([lookup.get(i, 0.0) for i in p.ids.tolist()]), 0.0)
    total = probs.sum()
    if total <= 0.0:  # p == q: a rejection has probability 0, any token of p is right
        return p
    return Dist(p.ids, probs / total)


def accept_sampled(draft: Sequence[int], target: Callable[[int], Dist],
                   proposal: Callable[[int], Dist | None],
                   uniform: Callable[[], float]) -> Verdict:
    """`target(i)`/`proposal(i)`: p and q after history plus draft[:i]; q None is one-hot."""
    for i, token in enumerate(draft):
        p, q = target(i), proposal(i)
        if uniform() >= accept_probability(p, q, token):
            return Verdict(i, (*draft[:i], draw(residual(p, q, token), uniform())))
    return Verdict(len(draft), (*draft, draw(target(len(draft)), uniform())))
