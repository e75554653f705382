"""How one request chooses its tokens: its sampler, seeded generator, grammar and logprobs.

With a grammar, the request samples from D: its sampler's candidates (after top-k/top-p/
min-p) that the grammar allows, renormalized; when the grammar allows none of them, the
candidates chosen among the allowed tokens only. The fast path draws x from the unmasked
candidates and keeps it when the grammar allows it, else draws again from D with the full
mask. That is exactly D: with A the candidates' allowed mass, an allowed x comes first with
probability p(x), or after a refusal (1 - A) from D with p(x)/A, in all p(x)/A = D(x); when
A = 0 every first draw is refused. Greedy is the case of one candidate, so a greedy request
pays for a mask only when the model's favourite token is forbidden.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from meshllm.common.types import TokenLogprob
from meshllm.worker.engine.batch.grammar import GrammarState, Mask
from meshllm.worker.engine.batch.logprobs import logprob_entry
from meshllm.worker.engine.batch.sampling import (
    Dist,
    Logits,
    SamplerSpec,
    distribution,
    draw,
    greedy_choice,
)
from meshllm.worker.engine.batch.speculative import Verdict, accept_matching


def allowed_dist(logits: Logits, spec: SamplerSpec, history: Sequence[int],
                 mask: Mask) -> Dist:
    """D above, as a distribution."""
    dist = distribution(logits, spec, history)
    keep = mask[dist.ids]
    if keep.any():
        probs = dist.probs[keep]
        return Dist(dist.ids[keep], probs / probs.sum())
    masked = np.where(mask, logits, np.float32(-np.inf)).astype(np.float32)
    return distribution(masked, spec, history)


class Picker:
    """Mutable: the engine thread alone uses it, one position at a time."""

    def __init__(self, spec: SamplerSpec, grammar: GrammarState | None,
                 logprobs: int | None, piece: Callable[[int], bytes]) -> None:
        self.spec = spec
        self.grammar = grammar
        self.logprobs = logprobs
        self._bits = np.random.PCG64(spec.seed)
        self._rng = np.random.Generator(self._bits)
        self.draws = 0  # uniform numbers drawn: a migrated request skips as many
        self._piece = piece
        self.entries: list[TokenLogprob] = []  # of the tokens picked, until taken
        # The draws made by the time each token picked was chosen, until taken: a
        # verification picks several, and a migration cut after any of them resumes there.
        self.marks: list[int] = []

    def skip_draws(self, draws: int) -> None:
        """Puts the generator where another picker for this request left it after `draws`
        numbers (one 64-bit step of PCG64 each), as if it had drawn them."""
        self._bits.advance(draws)
        self.draws += draws

    def uniform(self) -> float:
        self.draws += 1
        return float(self._rng.random())

    @property
    def plain(self) -> bool:
        return self.grammar is None and self.logprobs is None

    def take_entries(self) -> list[TokenLogprob]:
        out, self.entries = self.entries, []
        return out

    def take_marks(self) -> list[int]:
        out, self.marks = self.marks, []
        return out

    def pick(self, row: Logits, history: Sequence[int]) -> int:
        """The token at this position; the grammar moves past it."""
        spec, g, hist = self.spec, self.grammar, history
        token = (greedy_choice(row, spec, hist) if spec.greedy
                 else draw(distribution(row, spec, hist), self.uniform()))
        mask: Mask | None = None
        if g is not None and not g.allows(token):
            mask = g.mask()
            token = draw(allowed_dist(row, spec, hist, mask), self.uniform())
        self._record(row, hist, mask, token)
        self.marks.append(self.draws)
        return token

    def _record(self, row: Logits, hist: Sequence[int], mask: Mask | None,
                token: int) -> None:
        g = self.grammar
        if self.logprobs is not None:
            if g is not None and mask is None:
                mask = g.mask()
            self.entries.append(logprob_entry(row, self.spec, hist, mask, token,
                                              self.logprobs, self._piece))
        if g is not None:
            g.consume(token)

    def verify(self, draft: Sequence[int], rows: Sequence[Logits],
               history: Sequence[int]) -> Verdict:
        """`history`: what penalties look at (empty when the request has none).
        Speculative verification: each position's token is picked as `pick` would pick
        it without drafts (the same uniform numbers, the grammar moving past it), so a
        drafted token the grammar forbids is never kept and the output does not depend on
        the drafts (speculative.py)."""
        spec = self.spec
        if self.plain and spec.greedy:  # no numbers, grammar or logprobs: argmax alone
            return accept_matching(draft, lambda j: greedy_choice(rows[j], spec,
                                                                  [*history, *draft[:j]]))
        return accept_matching(draft, lambda j: self.pick(rows[j], [*history, *draft[:j]]))
