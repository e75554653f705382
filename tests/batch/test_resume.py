"""Resuming a generation on another engine (a migration) on the real model: an undisturbed
request is cut after each of several deltas, and a second request carries on from what the
first had sent (its sent token ids and its generator's draws). The client's view, the text,
the logprobs, the finish reason and the usage, must equal the undisturbed run's, for greedy
and seeded sampling, penalties, stop strings held back across the cut, logprobs, a JSON
schema and max_tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from meshllm.common.errors import InvalidGenerateRequest
from meshllm.common.models import materialize
from meshllm.common.types import (
    ChatMessage,
    Grammar,
    GrammarKind,
    Resume,
    SamplingParams,
    TokenLogprob,
)
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, Delta, SpecMode

from .collect import Collector, drain

pytestmark = pytest.mark.integration

SCHEMA = json.dumps({"type": "object", "properties": {
    "city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"]})


@dataclass(frozen=True)
class Case:
    prompt: str
    sampling: SamplingParams
    grammar: Grammar | None = None
    logprobs: int | None = None
    chat: bool = False


CASES = {
    "greedy": Case("Once upon a time", SamplingParams(max_tokens=40, temperature=0.0)),
    "seeded": Case("The meaning of life is", SamplingParams(
        max_tokens=40, temperature=0.9, top_p=0.95, seed=7, frequency_penalty=0.5)),
    # "the" is often held back as the possible start of "the end": cuts land inside holds
    "stop-held": Case("Tell me a story about the sea.", SamplingParams(
        max_tokens=48, temperature=0.0, stop=("the end", "\n\n")), chat=True),
    "logprobs-held": Case("Tell me a story about the sea.", SamplingParams(
        max_tokens=32, temperature=0.0, stop=("the end", "\n\n")), logprobs=2, chat=True),
    "json-schema": Case("Describe Paris as JSON.", SamplingParams(
        max_tokens=48, temperature=0.8, seed=11),
        Grammar(GrammarKind.JSON_SCHEMA, SCHEMA), chat=True),
    "length": Case("def fibonacci(n):", SamplingParams(max_tokens=24, temperature=0.0)),
}


@pytest.fixture(scope="module")
def engine() -> Iterator[BatchEngine]:
    yield BatchEngine(BatchConfig(model_path=str(materialize("gemma3-270m")), n_ctx=2048,
                                  n_slots=4, n_threads=2))


def _submit(eng: BatchEngine, rid: str, case: Case, sink: Collector,
            resume: Resume | None = None) -> None:
    chat = (ChatMessage("user", case.prompt),) if case.chat else None
    tokens, stops = eng.prompt_tokens(None if case.chat else case.prompt, chat, "")
    eng.submit(rid, tokens, case.sampling, sink, stops=stops, grammar=case.grammar,
               logprobs=case.logprobs, resume=resume)


def _resume_after(deltas: Sequence[Delta]) -> Resume:
    ids = tuple(t for d in deltas for t in d.sent_ids)
    draws = next((d.draws for d in reversed(deltas) if d.sent_ids), 0)
    return Resume(ids, draws)


def _logprobs(deltas: Sequence[Delta]) -> list[TokenLogprob]:
    return [e for d in deltas for e in d.logprobs]


@pytest.fixture(scope="module")
def speculating() -> Iterator[BatchEngine]:
    """n-gram drafts verified several tokens a step: a cut may fall inside a verification."""
    yield BatchEngine(BatchConfig(model_path=str(materialize("gemma3-270m")), n_ctx=2048,
                                  n_slots=4, n_threads=2, spec_mode=SpecMode.NGRAM))


@pytest.mark.parametrize("name", list(CASES))
def test_a_resumed_generation_continues_exactly(engine: BatchEngine, name: str) -> None:
    _cut_and_resume(engine, name)


@pytest.mark.parametrize("name", ["seeded", "json-schema", "logprobs-held"])
def test_speculation_changes_no_token_and_resumes_exactly(
        engine: BatchEngine, speculating: BatchEngine, name: str) -> None:
    """Seeded sampling with drafts gives the tokens it gives without (each position is
    picked with the numbers plain decoding uses), and a stream cut anywhere, inside a
    verification too, continues exactly."""
    plain, drafted = Collector(), Collector()
    _submit(engine, "plain", CASES[name], plain)
    drain(engine)
    _cut_and_resume(speculating, name)
    _submit(speculating, "drafted", CASES[name], drafted)
    drain(speculating)
    assert drafted.text["drafted"] == plain.text["plain"]
    assert _logprobs(drafted.deltas["drafted"]) == _logprobs(plain.deltas["plain"])


def _cut_and_resume(engine: BatchEngine, name: str) -> None:
    case = CASES[name]
    whole = Collector()
    _submit(engine, "whole", case, whole)
    drain(engine)
    deltas = whole.deltas["whole"]
    assert len(deltas) > 4 and not whole.failed
    # After a delta that holds text back (tokens sent but not all their ids), and elsewhere
    held = [i + 1 for i, d in enumerate(deltas[:-1]) if d.tokens != len(d.sent_ids)]
    assert held or not name.endswith("-held"), "no cut lands inside held-back text"
    cuts = sorted({1, 3, len(deltas) // 2, len(deltas) - 2, *held[:3]})
    for cut in cuts:
        resume = _resume_after(deltas[:cut])
        rest = Collector()
        _submit(engine, f"resumed-{cut}", case, rest, resume)
        drain(engine)
        before = "".join(d.text for d in deltas[:cut])
        got = rest.deltas.get(f"resumed-{cut}", [])
        assert before + "".join(d.text for d in got) == whole.text["whole"], (name, cut)
        assert _logprobs(deltas[:cut]) + _logprobs(got) == _logprobs(deltas), (name, cut)
        a, b = whole.finished["whole"], rest.finished[f"resumed-{cut}"]
        assert (b.reason, b.prompt_tokens, b.completion_tokens) == (
            a.reason, a.prompt_tokens, a.completion_tokens), (name, cut)
    print(f"{name}: {len(deltas)} deltas, cut after {cuts}, "
          f"{whole.finished['whole'].completion_tokens} tokens, held back after {held}")


def test_resumed_tokens_the_grammar_forbids_are_refused(engine: BatchEngine) -> None:
    case = CASES["json-schema"]
    bad = Resume(tuple(engine.tokenize("hello", add_bos=False)))
    with pytest.raises(InvalidGenerateRequest, match="grammar"):
        _submit(engine, "bad", case, Collector(), bad)


def test_a_resume_that_already_reached_max_tokens_is_refused(engine: BatchEngine) -> None:
    case = CASES["length"]
    done = Resume(tuple(engine.tokenize(" a" * 24, add_bos=False))[:24])
    with pytest.raises(InvalidGenerateRequest, match="max_tokens"):
        _submit(engine, "done", case, Collector(), done)
