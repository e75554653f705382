"""The constrained fast path is exact: drawing from the unmasked candidates and keeping an
allowed token, else drawing again with the full mask, gives the tokens distributed as D
(the candidates the grammar allows, renormalized; or, when it allows none, the candidates
among the allowed tokens), including under speculative verification; and a verification
picks, with the same seed, exactly the tokens plain picking would, whatever the drafts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from meshllm.common.types import Grammar, GrammarKind
from meshllm.worker.engine.batch.grammar import GrammarCompiler
from meshllm.worker.engine.batch.picker import Picker, allowed_dist
from meshllm.worker.engine.batch.sampling import SamplerSpec

from .scripted import EOG, ScriptedBackend, V, scripted_tokenizer

N = 6_000
# Rows (by seed): 3 has allowed and forbidden tokens among its top ones, 0 none allowed in
# its top 5.
ROWS = {s: np.random.default_rng(s).normal(0.0, 1.5, V).astype(np.float32) for s in (0, 3)}
COMPILER = GrammarCompiler(scripted_tokenizer, V, ScriptedBackend().is_eog)
LETTERS = Grammar(GrammarKind.LARK, "start: /[a-e]/ /[a-z]/")  # tokens 0-4 and 26-30


def empirical(row: np.ndarray, spec: SamplerSpec, draws: int,
              draft: list[int] | None = None) -> Counter[int]:
    """The first token of `draws` independent requests (fresh grammar and seed each)."""
    got: Counter[int] = Counter()
    for seed in range(draws):
        picker = Picker(SamplerSpec(**{**spec.__dict__, "seed": seed}),
                        COMPILER.compile(LETTERS), None, ScriptedBackend().piece)
        if draft is None:
            got[picker.pick(row, ())] += 1
        else:
            got[picker.verify(draft, [row] * (len(draft) + 1), ()).tokens[0]] += 1
    return got


@pytest.mark.parametrize(("row", "spec"), [
    (3, SamplerSpec(temperature=1.0)),
    (3, SamplerSpec(temperature=0.7, top_k=6)),
    (3, SamplerSpec(temperature=1.0, top_p=0.8)),
    (3, SamplerSpec(temperature=1.0, min_p=0.2)),
    (0, SamplerSpec(temperature=1.0, top_k=4)),  # no allowed candidate: among the allowed
], ids=["plain", "top_k", "top_p", "min_p", "none_allowed"])
@pytest.mark.parametrize("draft", [None, [7], [1]], ids=["pick", "draft_forbidden",
                                                         "draft_allowed"])
def test_constrained_choices_are_distributed_as_d(row: int, spec: SamplerSpec,
                                                  draft: list[int] | None) -> None:
    mask = COMPILER.compile(LETTERS).mask()
    want = allowed_dist(ROWS[row], spec, (), mask)
    assert all(mask[want.ids]) and not mask[EOG] and want.ids.size > 1
    got = empirical(ROWS[row], spec, N, draft)
    assert set(got) <= set(want.ids.tolist())
    for token, p in zip(want.ids.tolist(), want.probs.tolist(), strict=True):
        assert abs(got[token] / N - p) < 4 * np.sqrt(p * (1 - p) / N) + 1e-3, (token, p)


def test_greedy_takes_the_best_allowed_token() -> None:
    picker = Picker(SamplerSpec(temperature=0.0), COMPILER.compile(LETTERS), 3,
                    ScriptedBackend().piece)
    mask = COMPILER.compile(LETTERS).mask()
    best = int(np.argmax(np.where(mask, ROWS[0], -np.inf)))
    assert picker.pick(ROWS[0], ()) == best
    entry = picker.take_entries()[0]
    assert entry.top[0].logprob == entry.logprob and entry.top[0].token == entry.token


@pytest.mark.parametrize("grammar", [None, LETTERS], ids=["plain", "grammar"])
@pytest.mark.parametrize("logprobs", [None, 2], ids=["", "logprobs"])
def test_a_seeded_verification_picks_what_plain_picking_would(
        grammar: Grammar | None, logprobs: int | None) -> None:
    """Positions verified in steps of random drafts (some matching the picks, some not)
    give the tokens, the generator's draws after each, and the logprobs of picking one
    position at a time."""
    rng = np.random.default_rng(5)
    rows = [rng.normal(0.0, 1.5, V).astype(np.float32) for _ in range(2 if grammar else 40)]
    spec = SamplerSpec(temperature=1.0, top_k=8, seed=3)

    def picker() -> Picker:
        compiled = COMPILER.compile(grammar) if grammar is not None else None
        return Picker(spec, compiled, logprobs, ScriptedBackend().piece)

    plain = picker()
    want = [plain.pick(row, ()) for row in rows]
    want_marks, want_entries = plain.take_marks(), plain.take_entries()
    spec_picker, got = picker(), list[int]()
    while len(got) < len(rows):
        left = len(rows) - len(got) - 1
        n = int(rng.integers(0, min(4, left) + 1))
        # A draft that follows the plain picks for a while, then guesses.
        draft = [want[len(got) + j] if rng.random() < 0.7 else int(rng.integers(V))
                 for j in range(n)]
        verdict = spec_picker.verify(draft, rows[len(got):len(got) + n + 1], ())
        got += verdict.tokens
    assert got == want
    assert spec_picker.take_marks() == want_marks
    assert spec_picker.take_entries() == want_entries
