"""Grammars, logprobs and the sampling extensions on the scripted model: token t is the
letter chr(97 + t % 26), EOG is token 31."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.types import Grammar, GrammarKind, SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, SpecMode

from .collect import Collector, drain
from .scripted import EOG, ChargedBackend, CorruptingDrafter, ScriptedBackend, solo_greedy

GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 1, 4, 1, 5, 9, 2, 6]]
# The scripted model's favourites are mostly outside a-e: the grammar decides a lot.
FEW_LETTERS = Grammar(GrammarKind.LARK, "start: /[a-e]{3,12}/")


def engine(spec: bool = False, n_slots: int = 4) -> BatchEngine:
    cfg = BatchConfig(model_path="scripted", n_ctx=1024, n_slots=n_slots, n_batch=64,
                      spec_mode=SpecMode.NGRAM if spec else SpecMode.NONE, draft_max=4)
    if not spec:
        return BatchEngine(cfg, ScriptedBackend())
    backend = ChargedBackend()  # passes dear: drafting pays whatever this machine's speed
    return BatchEngine(cfg, backend, CorruptingDrafter(), clock=backend.clock)


def run(eng: BatchEngine, sampling: SamplingParams = GREEDY, grammar: Grammar | None = None,
        logprobs: int | None = None, prompts: list[list[int]] = PROMPTS) -> Collector:
    c = Collector()
    for i, p in enumerate(prompts):
        eng.submit(f"r{i}", p, sampling, c, grammar=grammar, logprobs=logprobs)
    drain(eng)
    assert not c.failed
    return c


def test_a_grammar_lets_only_its_tokens_through_and_stops_when_complete() -> None:
    c = run(engine(), grammar=FEW_LETTERS)
    for r, text in c.text.items():
        assert re.fullmatch("[a-e]{3,12}", text), text
        assert c.finished[r].reason == "stop"  # complete: 12 letters, or EOG while accepting
    assert c.text != run(engine()).text


def test_end_of_generation_is_allowed_only_while_the_grammar_accepts() -> None:
    wants_eog = SamplingParams(max_tokens=20, temperature=0.0, logit_bias=((EOG, 100.0),))
    plain = run(engine(), wants_eog)
    assert not plain.text and {f.completion_tokens for f in plain.finished.values()} == {0}
    exact = run(engine(), wants_eog, Grammar(GrammarKind.LARK, 'start: "abc"'))
    assert set(exact.text.values()) == {"abc"}
    assert {f.reason for f in exact.finished.values()} == {"stop"}
    at_least_one = run(engine(), wants_eog, Grammar(GrammarKind.LARK, 'start: "a" "b"*'))
    assert set(at_least_one.text.values()) == {"a"}


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(max_tokens=20, temperature=1.0,
                                                             seed=5)])
def test_speculation_never_keeps_a_draft_the_grammar_forbids(sampling: SamplingParams) -> None:
    eng = engine(spec=True)
    c = run(eng, sampling, FEW_LETTERS)
    assert all(re.fullmatch("[a-e]{3,12}", t) for t in c.text.values()), c.text
    assert eng.stats().drafted_tokens > eng.stats().accepted_tokens > 0
    if sampling is GREEDY:  # exactly what the constrained target picks alone
        assert c.text == run(engine(), sampling, FEW_LETTERS).text


def test_sampled_constrained_output_is_reproducible_and_sampled() -> None:
    sampled = SamplingParams(max_tokens=20, temperature=1.0, seed=3)
    a, b = run(engine(), sampled, FEW_LETTERS), run(engine(), sampled, FEW_LETTERS)
    assert a.text == b.text and a.text != run(engine(), GREEDY, FEW_LETTERS).text


@pytest.mark.parametrize("spec", [False, True])
@pytest.mark.parametrize("grammar", [None, FEW_LETTERS])
def test_logprobs_come_one_per_token_with_the_greedy_choice_on_top(
        spec: bool, grammar: Grammar | None) -> None:
    c = run(engine(spec), GREEDY, grammar, logprobs=3)
    for r, entries in c.logprobs.items():
        assert len(entries) == len(c.ids[r]) == c.finished[r].completion_tokens
        assert "".join(e.token for e in entries) == c.text[r]
        for e in entries:
            assert len(e.top) == 3 and e.top[0].token == e.token
            assert e.logprob == e.top[0].logprob <= 0.0
            assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
            assert sum(math.exp(t.logprob) for t in e.top) <= 1.0 + 1e-9
            if grammar is not None:
                assert all(t.token in "abcde" for t in e.top)
    assert c.logprobs == run(engine(not spec), GREEDY, grammar, logprobs=3).logprobs


def test_logprobs_are_the_distribution_before_temperature() -> None:
    hot = run(engine(), SamplingParams(max_tokens=5, temperature=2.0, seed=1), logprobs=2,
              prompts=[[1, 2, 3]])
    row = ScriptedBackend().logits([1, 2, 3])
    first = hot.logprobs["r0"][0]
    want = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
    assert first.top[0].logprob == pytest.approx(float(want.max()))
    assert first.logprob == pytest.approx(float(want[hot.ids["r0"][0]]))


def test_logprobs_held_back_by_a_stop_string_stay_in_order_and_go_with_it() -> None:
    want = "".join(chr(97 + t % 26) for t in solo_greedy([1, 2, 3], 20))
    assert want.startswith("uifmguifmg")
    c = run(engine(), SamplingParams(max_tokens=20, temperature=0.0, stop=("mgu",)),
            logprobs=0, prompts=[[1, 2, 3]])
    assert c.text["r0"] == "uif"
    assert "".join(e.token for e in c.logprobs["r0"]) == "uif"
    assert all(e.top == () for e in c.logprobs["r0"])
    partial = run(engine(), SamplingParams(max_tokens=20, temperature=0.0,
                                           stop=("g#",)),
                  logprobs=1, prompts=[[1, 2, 3]])  # each g is held; the last one to the end
    assert "".join(e.token for e in partial.logprobs["r0"]) == partial.text["r0"] == want


def test_logit_bias_bans_a_token() -> None:
    favourite = solo_greedy([1, 2, 3], 1)[0]
    banned = run(engine(), SamplingParams(max_tokens=20, temperature=0.0,
                                          logit_bias=((favourite, -100.0),)))
    assert all(favourite not in ids for ids in banned.ids.values())
    assert banned.ids["r0"][0] != favourite


def test_min_p_and_top_k_cut_the_tail() -> None:
    # The scripted row: 3.0 at the favourite, 2.0 at a second token, 0 elsewhere.
    sampled = SamplingParams(max_tokens=20, temperature=1.0, seed=11)
    greedy = run(engine(), GREEDY).ids
    assert run(engine(), sampled).ids != greedy
    min_p = SamplingParams(max_tokens=20, temperature=1.0, seed=11, min_p=0.5)
    assert run(engine(), min_p).ids == greedy  # exp(2 - 3) = 0.37 < 0.5: only the favourite
    top_k = SamplingParams(max_tokens=20, temperature=1.0, seed=11, top_k=1)
    assert run(engine(), top_k).ids == greedy
    repeat = SamplingParams(max_tokens=20, temperature=0.0, repeat_penalty=50.0)
    assert run(engine(), repeat).ids != greedy


@pytest.mark.parametrize(("grammar", "names"), [
    (Grammar(GrammarKind.JSON_SCHEMA, "{not json"), "not valid JSON"),
    (Grammar(GrammarKind.JSON_SCHEMA, "[1, 2]"), "must be an object"),
    (Grammar(GrammarKind.JSON_SCHEMA, '{"type": "strin"}'), "strin"),
    (Grammar(GrammarKind.JSON_SCHEMA, '{"type": "string", "format": "weird"}'), "weird"),
    (Grammar(GrammarKind.JSON_SCHEMA, '{"type": "string", "pattern": "(?=a)b"}'), "look"),
    (Grammar(GrammarKind.LARK, "start: undefined_rule"), "undefined_rule"),
])
def test_invalid_or_unsupported_grammars_are_refused_at_submit(grammar: Grammar,
                                                               names: str) -> None:
    with pytest.raises(InvalidGenerateRequest) as err:
        engine().submit("x", [1], GREEDY, Collector(), grammar=grammar)
    expected_param = "tools" if grammar.kind is GrammarKind.LARK else "response_format"
    assert err.value.param == expected_param and names in str(err.value)


def test_each_grammar_is_compiled_once() -> None:
    eng = engine()
    run(eng, grammar=FEW_LETTERS)
    run(eng, grammar=Grammar(GrammarKind.LARK, "start: /[a-e]{3,12}/"))
    assert eng.grammars.cached == 1


def test_logprobs_beyond_twenty_are_refused() -> None:
    with pytest.raises(InvalidGenerateRequest) as err:
        engine().submit("x", [1], GREEDY, Collector(), logprobs=21)
    assert err.value.param == "logprobs"
