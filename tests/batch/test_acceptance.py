"""The acceptance rule is exact: greedy keeps only the target's choices, and speculative
sampling leaves the output distributed as the target's p."""

from __future__ import annotations

import numpy as np
import pytest
from meshllm.worker.engine.batch.sampling import Dist
from meshllm.worker.engine.batch.speculative import (
    Verdict,
    accept_greedy,
    accept_probability,
    accept_sampled,
    residual,
)


@pytest.mark.parametrize(("draft", "choices", "verdict"), [
    ([], [5], Verdict(0, (5,))),
    ([5, 6, 7], [5, 6, 7, 8], Verdict(3, (5, 6, 7, 8))),  # all kept plus a bonus token
    ([5, 6, 7], [5, 9, 7, 8], Verdict(1, (5, 9))),  # first disagreement: the target's token
    ([5, 6], [4, 6, 1], Verdict(0, (4,))),
])
def test_accept_greedy(draft: list[int], choices: list[int], verdict: Verdict) -> None:
    assert accept_greedy(draft, choices.__getitem__) == verdict


def dist(probs: list[float], ids: list[int] | None = None) -> Dist:
    return Dist(np.array(ids if ids is not None else range(len(probs))), np.array(probs))


CASES = [
    (dist([0.5, 0.3, 0.2]), None, 0),
    (dist([0.5, 0.3, 0.2]), None, 2),
    (dist([0.1, 0.6, 0.3]), dist([0.7, 0.2, 0.1]), 0),
    (dist([0.1, 0.6, 0.3]), dist([0.7, 0.2, 0.1]), 1),
    (dist([0.25, 0.75], [3, 9]), dist([1.0], [9]), 9),
    (dist([1.0], [4]), None, 4),  # p == q: never rejected
]


@pytest.mark.parametrize(("p", "q", "token"), CASES)
def test_one_step_output_distribution_is_p(p: Dist, q: Dist | None, token: int) -> None:
    """Sum over the draft: q(x)·accept(x)·[x=t] + q(x)·(1-accept(x))·residual(t) = p(t)."""
    qd = q if q is not None else Dist(np.array([token]), np.array([1.0]))
    out: dict[int, float] = {}
    for x, qx in zip(qd.ids.tolist(), qd.probs.tolist(), strict=True):
        a = accept_probability(p, q if q is not None else None, x)
        out[x] = out.get(x, 0.0) + qx * a
        r = residual(p, q, x)
        for t, rt in zip(r.ids.tolist(), r.probs.tolist(), strict=True):
            out[t] = out.get(t, 0.0) + qx * (1 - a) * rt
    for t, pt in zip(p.ids.tolist(), p.probs.tolist(), strict=True):
        assert out.get(t, 0.0) == pytest.approx(pt, abs=1e-12)


def test_sampled_two_token_drafts_match_p_empirically() -> None:
    """Monte Carlo over accept_sampled itself, seeded: the first emitted token ~ p0 and,
    given it, the second ~ p1."""
    p = [dist([0.5, 0.3, 0.2]), dist([0.1, 0.1, 0.8]), dist([0.3, 0.3, 0.4])]
    rng = np.random.default_rng(7)
    first, n = np.zeros(3), 40_000
    for _ in range(n):
        v = accept_sampled([1, 2], p.__getitem__, lambda i: None, lambda: float(rng.random()))
        first[v.tokens[0]] += 1
        assert v.tokens[: v.accepted] == (1, 2)[: v.accepted]
    assert np.abs(first / n - p[0].probs).max() < 0.01
