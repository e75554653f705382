"""The acceptance rule keeps drafted tokens only while they equal the target's own picks:
the output is the target's, whatever the drafts (speculative.py)."""

from __future__ import annotations

import pytest
from meshllm.worker.engine.batch.speculative import Verdict, accept_matching


@pytest.mark.parametrize(("draft", "choices", "verdict"), [
    ([], [5], Verdict(0, (5,))),
    ([5, 6, 7], [5, 6, 7, 8], Verdict(3, (5, 6, 7, 8))),  # all kept plus a bonus token
    ([5, 6, 7], [5, 9, 7, 8], Verdict(1, (5, 9))),  # first disagreement: the target's token
    ([5, 6], [4, 6, 1], Verdict(0, (4,))),
])
def test_drafts_are_kept_while_they_match(draft: list[int], choices: list[int],
                                          verdict: Verdict) -> None:
    picked: list[int] = []

    def pick(i: int) -> int:
        picked.append(i)
        return choices[i]

    assert accept_matching(draft, pick) == verdict
    # Picked in order, once each, and never past the first disagreement: a pick may
    # consume random numbers, and each one picked is emitted.
    assert picked == list(range(len(verdict.tokens)))
