"""The acceptance rule of speculative decoding, as a pure function.

The target picks its token at each drafted position as it would without drafts (argmax
for greedy; for a sampled request a draw with the request's next uniform numbers), and a
drafted token is kept only while it equals the target's pick; the first disagreement is
replaced by that pick. So the output is exactly what the target alone emits, token for
token: for greedy as for a seeded sampled request, whose picks consume the same numbers
in the same order with or without drafts, however many a step verifies. A request
migrated mid-stream resumes its generator after the numbers its sent tokens used, so it
continues exactly even when the cut fell inside a verification.

For a sampled request this is speculative sampling with a one-hot proposal, which our
drafters make (n-gram matches and a greedy draft model are deterministic): a drafted x is
kept with probability p(x), the rate of the standard rule min(1, p(x)/q(x)) at q(x) = 1,
and a rejection's token is distributed as p without x, the standard residual. The
standard rule's own draws (one to accept, one to replace) would tie the numbers to the
drafts, and a stream's tokens to how its steps happened to be cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    accepted: int  # drafted tokens kept
    tokens: tuple[int, ...]  # what to emit: the kept drafts, then one token of the target


def accept_matching(draft: Sequence[int], pick: Callable[[int], int]) -> Verdict:
    """`pick(i)`: the target's token after the history plus draft[:i], called in order and
    only while the drafts before it were kept (it may consume random numbers)."""
    for i, token in enumerate(draft):
        target = pick(i)
        if target != token:
            return Verdict(i, (*draft[:i], target))
    return Verdict(len(draft), (*draft, pick(len(draft))))
