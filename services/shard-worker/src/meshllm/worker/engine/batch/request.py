"""One request's life inside a slot: prompt progress, sampling state and streamed output."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshllm.common.errors import InvalidGenerateRequest, PromptTooLong
from meshllm.common.types import Resume, SamplingParams, TokenLogprob
from meshllm.worker.engine.batch.draft_tuning import Acceptance
from meshllm.worker.engine.batch.events import Delta, Event, Finished, OnEvent
from meshllm.worker.engine.batch.grammar import GrammarState
from meshllm.worker.engine.batch.logprobs import TextRelease
from meshllm.worker.engine.batch.picker import Picker
from meshllm.worker.engine.batch.sampling import SamplerSpec
from meshllm.worker.engine.batch.stops import StopMatcher


@dataclass(frozen=True)
class Submission:
    request_id: str
    prompt: tuple[int, ...]
    spec: SamplerSpec
    stops: tuple[str, ...]
    limit: int  # most completion tokens (max_tokens capped by the slot's context)
    on_event: OnEvent
    grammar: GrammarState | None = None  # compiled at submit, advanced by the engine thread
    logprobs: int | None = None  # None: no logprobs; n: each token's and its n most likely
    # A migrated request: the prompt ends with the `resumed` tokens another replica
    # generated (the grammar has consumed them), and its generator had made `draws` draws.
    resumed: int = 0
    draws: int = 0

# Stands for the logprobs of tokens a migrated request replays: the client has them already.
_REPLAYED = TokenLogprob("", b"", 0.0)


class Active:
    """Mutable by design: the engine thread alone advances it, one step at a time."""

    def __init__(self, sub: Submission, reused: int, admitted: int,
                 piece: Callable[[int], bytes], is_eog: Callable[[int], bool]) -> None:
        self.sub = sub
        self.done = reused  # prompt tokens in the KV
        self.reused = reused
        self.admitted = admitted
        self.generated: list[int] = []
        self.picker = Picker(sub.spec, sub.grammar, sub.logprobs, piece)
        self.reason: str | None = None
        # The chance that a drafted token of this request is kept (draft_tuning): its own,
        # since one request may repeat its context while the next does not.
        self.acceptance = Acceptance()
        self._piece, self._is_eog = piece, is_eog
        self._matcher = StopMatcher(sub.stops)
        self._stop_hit = False
        # A token may end inside a UTF-8 sequence: decode incrementally.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._logprobs: TextRelease[TokenLogprob] | None = (
            TextRelease() if sub.logprobs is not None else None)
        self._sent: TextRelease[tuple[int, int]] = TextRelease()  # (token, draws by then)
        if sub.resumed:
            self._replay(sub.prompt[len(sub.prompt) - sub.resumed:])

    def _replay(self, tokens: Sequence[int]) -> None:
        """Brings the text state (UTF-8 decoder, stop matcher, held logprobs) to where the
        first replica left it: the same pieces fed in the same order hold back the same text,
        which this replica sends when it comes, as the first would have."""
        self.picker.skip_draws(self.sub.draws)
        for token in tokens:
            piece = self._decoder.decode(self._piece(token))
            if self._logprobs is not None:
                self._logprobs.add(_REPLAYED, len(piece))
            self._sent.add((token, self.sub.draws), len(piece))
            piece, _ = self._matcher.feed(piece)
            if self._logprobs is not None:
                self._logprobs.release(len(piece))
            self._sent.release(len(piece))

    @property
    def prompt_left(self) -> int:
        return len(self.sub.prompt) - self.done

    @property
    def remaining(self) -> int:
        return self.sub.limit - len(self.generated)

    def history(self, extra: Sequence[int] = ()) -> list[int]:
        return [*self.sub.prompt, *self.generated, *extra]

    def emit(self, tokens: Sequence[int], out: list[Event],
             entries: Sequence[TokenLogprob] = (), marks: Sequence[int] = ()) -> int:
        """Appends tokens until one ends the request; returns how many were taken.
        `entries`: the tokens' logprobs, when the request asked for them; `marks`: the
        generator's draws when each was picked (Picker.marks; none: its draws now)."""
        text, start = "", len(self.generated)
        sent: list[TokenLogprob] = []
        ids: list[tuple[int, int]] = []
        for k, token in enumerate(tokens):
            if self._is_eog(token):
                self.reason = "stop"
                break
            self.generated.append(token)
            piece = self._decoder.decode(self._piece(token))
            if self._logprobs is not None:
                self._logprobs.add(entries[k], len(piece))
            self._sent.add((token, marks[k] if k < len(marks) else self.picker.draws),
                           len(piece))
            piece, stopped = self._matcher.feed(piece)
            text += piece
            if self._logprobs is not None:
                sent += self._logprobs.release(len(piece))
            ids += self._sent.release(len(piece))
            if self._ends(stopped):
                break
        taken = tuple(self.generated[start:])
        if taken or text:
            out.append(self._delta(text, taken, sent, ids))
        return len(taken)

    def _delta(self, text: str, taken: Sequence[int], logprobs: Sequence[TokenLogprob],
               sent: Sequence[tuple[int, int]]) -> Delta:
        return Delta(self.sub.request_id, text, len(taken), tuple(taken), tuple(logprobs),
                     tuple(t for t, _ in sent), sent[-1][1] if sent else 0)

    def _ends(self, stopped: bool) -> bool:
        """Whether the token just appended ends the request (setting the reason)."""
        grammar = self.sub.grammar
        if stopped:
            self.reason, self._stop_hit = "stop", True
            self._sent.drop()
            if self._logprobs is not None:
                self._logprobs.drop()  # the stop string's tokens go with its text
        elif grammar is not None and grammar.stopped_at == self.sub.resumed + len(
                self.generated):
            self.reason = "stop"  # the grammar is complete: nothing but its end may follow
        elif self.remaining <= 0:
            self.reason = "length"
        return self.reason is not None

    def finish(self, reason: str, out: list[Event]) -> None:
        self.reason = reason
        # Nothing follows a stop string, not even held-back bytes.
        tail = "" if self._stop_hit else (
            self._matcher.flush() + self._decoder.decode(b"", final=True))
        held = self._logprobs.flush() if self._logprobs is not None else ()
        ids = () if self._stop_hit else self._sent.flush()
        if tail or held or ids:
            out.append(self._delta(tail, (), held, ids))
        resumed = self.sub.resumed
        prompt = len(self.sub.prompt) - resumed
        out.append(Finished(self.sub.request_id, reason, prompt, min(self.reused, prompt),
                            resumed + len(self.generated)))


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the engine's slots and model."""

    n_ctx_slot: int      # tokens of one slot's context
    n_vocab: int
    default_seed: int | None  # of requests without a seed (None: random)


def checked_submission(limits: RequestLimits, request_id: str, prompt: Sequence[int],
                       sampling: SamplingParams, on_event: OnEvent, stops: Sequence[str],
                       resume: Resume | None = None) -> Submission:
    """A request as the engine queues it; raises PromptTooLong or InvalidGenerateRequest
    (naming the field) when it cannot run. `resume`: carry on where another replica
    stopped (its tokens join the prompt and count against max_tokens)."""
    n_ctx, vocab = limits.n_ctx_slot, limits.n_vocab
    resumed = resume.token_ids if resume is not None else ()
    prompt = (*prompt, *resumed)
    if not prompt:
        raise InvalidGenerateRequest("the prompt has no tokens")
    if len(prompt) >= n_ctx:
        raise PromptTooLong(len(prompt), n_ctx)
    if any(not 0 <= t < vocab for t in prompt):
        raise InvalidGenerateRequest("a token id is outside the model's vocabulary")
    if any(not 0 <= t < vocab for t, _ in sampling.logit_bias):
        raise InvalidGenerateRequest(
            f"logit_bias names a token id outside the vocabulary (0..{vocab - 1})",
            "logit_bias")
    budget = n_ctx - len(prompt)  # max_tokens counts the resumed tokens too
    limit = min(max(0, sampling.max_tokens - len(resumed)) if sampling.max_tokens
                else budget, budget)
    if resume is not None and limit == 0:
        raise InvalidGenerateRequest("the resumed tokens already reach max_tokens", "resume")
    spec = SamplerSpec.from_params(sampling, default_seed=limits.default_seed)
    return Submission(request_id, tuple(prompt), spec, (*sampling.stop, *stops), limit,
                      on_event, resumed=len(resumed),
                      draws=resume.draws if resume is not None else 0)
