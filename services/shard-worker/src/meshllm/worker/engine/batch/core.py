"""BatchEngine: continuous batching over one llama.cpp context with n_slots sequences.

Each step feeds llama_decode one token (plus drafts) of every generating slot and bounded
chunks of new prompts; requests join between steps and leave when done. `submit` and
`cancel` are thread-safe; `step` and `run_forever` belong to one engine thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from meshllm.common.errors import InvalidGenerateRequest, MeshError, PromptTooLong
from meshllm.common.types import ChatMessage, Grammar, Resume, SamplingParams
from meshllm.worker.engine.batch.backend import Backend, LlamaBackend
from meshllm.worker.engine.batch.config import BatchConfig, SpecMode
from meshllm.worker.engine.batch.draft import Drafter, ModelDrafter, NgramDrafter
from meshllm.worker.engine.batch.draft_tuning import usable_rtt_s
from meshllm.worker.engine.batch.embed import (
    Embedder,
    EmbedJob,
    EmbedResult,
    OnEmbedded,
    check_inputs,
)
from meshllm.worker.engine.batch.errors import (
    DuplicateRequest,
    EngineStopped,
    QueueFull,
    engine_error,
)
from meshllm.worker.engine.batch.events import EngineStats, Event, Failed, Finished, OnEvent
from meshllm.worker.engine.batch.grammar import GrammarCompiler, replay_grammar
from meshllm.worker.engine.batch.load_options import LoadOptions
from meshllm.worker.engine.batch.logprobs import MAX_TOP_LOGPROBS
from meshllm.worker.engine.batch.prefix import FreeSlot, place
from meshllm.worker.engine.batch.prompt import PromptBuilder
from meshllm.worker.engine.batch.request import Active, Submission
from meshllm.worker.engine.batch.sampling import SamplerSpec
from meshllm.worker.engine.batch.step import Counters, StepRunner

log = logging.getLogger(__name__)


def make_drafter(config: BatchConfig, n_batch: int) -> Drafter | None:
    if config.spec_mode is SpecMode.NGRAM:
        return NgramDrafter(config.ngram_max, config.ngram_min)
    if config.spec_mode is SpecMode.DRAFT:
        assert config.draft_model_path is not None  # BatchConfig checks it
        # Small by design: held whole in this process even when the target is split (a
        # draft offloaded to the stages would add their round trips to every proposal),
        # with the target's repacking so that both run the same kernels.
        draft = LlamaBackend(config.draft_model_path, config.context(n_batch),
                             LoadOptions(repack=config.model_load.repack))
        return ModelDrafter(draft, config.n_slots, n_batch)
    return None


class BatchEngine:
    def __init__(self, config: BatchConfig, backend: Backend | None = None,
                 drafter: Drafter | None = None,
                 embedder: Callable[[], Embedder] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self._backend: Backend = backend or LlamaBackend(
            config.model_path, config.context(config.n_batch), config.model_load)
        if drafter is None and backend is None and config.speculative:
            drafter = make_drafter(config, config.n_batch)
        self._counters = Counters()
        self._runner = StepRunner(config, self._backend, drafter, self._counters, clock)
        self._cond = threading.Condition()
        self._queue: deque[Submission] = deque()
        self._sinks: dict[str, OnEvent] = {}  # every queued or running request
        self._cancelled: set[str] = set()
        self._dropped: list[Event] = []  # events for requests that never reached a slot
        self._link_rtt_s: float | None = None  # a new round trip, for the next step
        self._running = 0
        self._stopping = False
        self._embeds: deque[EmbedJob] = deque()
        self._embedder: Embedder | None = None
        # A split head would need its stages to run a second context too: refused for now.
        self._make_embedder = (None if config.load.offload is not None
                               else embedder or self._llama_embedder())
        self._thread: threading.Thread | None = None
        # Built at load so the log says which chat template the model uses.
        self._prompts = (PromptBuilder(self._backend, config.chat_template)
                         if isinstance(self._backend, LlamaBackend) else None)
        self.grammars = GrammarCompiler(self._backend.grammar_tokenizer, self._backend.n_vocab,
                                        self._backend.is_eog)

    def _llama_embedder(self) -> Callable[[], Embedder] | None:
        backend, c = self._backend, self.config
        if not isinstance(backend, LlamaBackend):
            return None
        return lambda: backend.embedder(c.embed_tokens, c.embed_seqs)

    # --- caller side (any thread) ---------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._backend.tokenize(text, add_bos)

    def prompt_tokens(self, text: str | None, chat: tuple[ChatMessage, ...] | None,
                      tools_json: str = "") -> tuple[list[int], tuple[str, ...]]:
        """(tokens, the chat template's stop strings) for a text prompt or chat messages
        (with the request's tools, a JSON list, rendered into the chat prompt).
        Too long prompts are refused by submit(), against the slot's context."""
        if not isinstance(self._backend, LlamaBackend):
            raise InvalidGenerateRequest("prompt rendering needs the llama.cpp backend")
        if self._prompts is None:
            self._prompts = PromptBuilder(self._backend, self.config.chat_template)
        return self._prompts.prompt_tokens(text, chat, tools_json)

    def submit(self, request_id: str, prompt_tokens: Sequence[int], sampling: SamplingParams,
               on_event: OnEvent, *, stops: Sequence[str] = (), grammar: Grammar | None = None,
               logprobs: int | None = None, resume: Resume | None = None) -> None:
        """Queues a request; raises QueueFull past the bound, PromptTooLong, or
        InvalidGenerateRequest (also for a grammar that is invalid or unsupported: it is
        compiled here, on the caller's thread, not on the engine's). `resume`: carry on
        where another replica stopped. Events arrive on the engine thread."""
        sub = self._submission(request_id, prompt_tokens, sampling, on_event, stops, resume)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidGenerateRequest(
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "logprobs")
        if grammar is not None or logprobs is not None:
            sub = dataclasses.replace(sub, logprobs=logprobs, grammar=None if grammar is None
                                      else self.grammars.compile(grammar))
        if sub.grammar is not None and resume is not None:
            replay_grammar(sub.grammar, resume.token_ids)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if request_id in self._sinks:
                raise DuplicateRequest(request_id)
            waiting = len(self._queue)
            if self._running + waiting >= self.config.n_slots + self.config.max_queue:
                raise QueueFull(self._running, waiting, self.config.max_queue)
            self._queue.append(sub)
            self._sinks[request_id] = on_event
            self._cond.notify_all()

    def _submission(self, request_id: str, prompt: Sequence[int], sampling: SamplingParams,
                    on_event: OnEvent, stops: Sequence[str],
                    resume: Resume | None = None) -> Submission:
        n_ctx = self.config.n_ctx_slot
        resumed = resume.token_ids if resume is not None else ()
        prompt = (*prompt, *resumed)
        if not prompt:
            raise InvalidGenerateRequest("the prompt has no tokens")
        if len(prompt) >= n_ctx:
            raise PromptTooLong(len(prompt), n_ctx)
        vocab = getattr(self._backend, "n_vocab", 0)
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
            raise InvalidGenerateRequest("the resumed tokens already reach max_tokens",
                                         "resume")
        spec = SamplerSpec.from_params(sampling, default_seed=self.config.seed)
        return Submission(request_id, tuple(prompt), spec, (*sampling.stop, *stops), limit,
                          on_event, resumed=len(resumed),
                          draws=resume.draws if resume is not None else 0)

    def submit_embed(self, request_id: str, inputs: Sequence[str | Sequence[int]],
                     on_done: OnEmbedded) -> None:
        """Queues inputs to embed: texts are tokenized here (with the BOS a prompt gets),
        token lists are used as given. Raises InvalidGenerateRequest (a bad input, a model
        that cannot embed), QueueFull or EngineStopped; `on_done` gets the result on the
        engine thread."""
        if self._make_embedder is None:
            why = ("is split across workers" if self.config.load.offload is not None
                   else "runs on a backend without embeddings")
            raise InvalidGenerateRequest(f"this model {why}: it serves no embeddings", "model")
        tokens = tuple(tuple(self._backend.tokenize(i)) if isinstance(i, str) else tuple(i)
                       for i in inputs)
        check_inputs(tokens, self._backend.n_vocab, self.config.embed_tokens)
        job = EmbedJob(request_id, tokens, on_done)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._embeds) > self.config.max_queue:
                raise QueueFull(1, len(self._embeds), self.config.max_queue)
            self._embeds.append(job)
            self._cond.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Ends a request: at once if still queued, else at the next step."""
        with self._cond:
            if request_id not in self._sinks:
                return False
            for sub in self._queue:
                if sub.request_id == request_id:
                    self._queue.remove(sub)
                    self._dropped.append(Finished(request_id, "cancelled",
                                                  len(sub.prompt) - sub.resumed, 0, 0))
                    break
            else:
                self._cancelled.add(request_id)
            self._cond.notify_all()
            return True

    def set_link_rtt(self, rtt_s: float) -> None:
        """The split's links changed: the draft tuner takes `rtt_s` (a step's round trips
        to the stages) from the next step on; any thread."""
        with self._cond:
            self._link_rtt_s = usable_rtt_s(rtt_s)

    @property
    def link_rtt_s(self) -> float:
        """The round trip the draft tuner uses (or will from the next step)."""
        with self._cond:
            pending = self._link_rtt_s
        return self._runner.link_rtt_s if pending is None else pending

    def stats(self) -> EngineStats:
        c = self._counters
        with self._cond:
            running, queued = self._running, len(self._queue)
        return EngineStats(running, queued, self.config.max_queue, self.config.n_slots,
                           c.steps, c.seq_steps, c.generated, c.prompt_processed,
                           c.prompt_cached, c.drafted, c.accepted,
                           round(self.link_rtt_s * 1e6))

    # --- engine thread -------------------------------------------------------------

    def step(self) -> bool:
        """One engine step; returns False when there was nothing to do."""
        with self._cond:
            subs = self._take_admissible()
            cancelled, self._cancelled = self._cancelled, set()
            events, self._dropped = self._dropped, []
            rtt_s, self._link_rtt_s = self._link_rtt_s, None
        if rtt_s is not None:  # the runner and its tuner belong to this thread
            self._runner.link_rtt_s = rtt_s
        for sub in subs:
            self._admit(sub)
        did = self._runner.run(cancelled, events) or bool(subs)
        self._dispatch(events)
        embedded = self._embed_step()  # after the streams' step: they never wait on two
        return did or embedded or bool(events)

    def _embed_step(self) -> bool:
        """One chunk of the oldest embedding request: at most one bounded decode."""
        with self._cond:
            job = self._embeds[0] if self._embeds else None
        if job is None:
            return False
        result: EmbedResult | MeshError | None
        try:
            if self._embedder is None:
                assert self._make_embedder is not None  # submit_embed checked it
                self._embedder = self._make_embedder()
            # While streams run, a chunk costs them no more than a prompt chunk would.
            budget = self.config.prefill_chunk if self._running else self.config.embed_tokens
            result = job.run_chunk(self._embedder, budget)
        except Exception as exc:  # the request's answer; the engine serves on
            log.exception("embedding request %s failed", job.request_id)
            result = engine_error(exc)
        if result is not None:
            with self._cond:
                self._embeds.popleft()
            self._answer_embed(job, result)
        return True

    def embedding_context_held(self) -> bool:
        """Whether an embedding context is allocated now (freed after embed_idle_s)."""
        return self._embedder is not None

    def release_embedder(self) -> None:
        """Free the embedding context (engine thread only); the next request makes one."""
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
            log.info("embedding context freed (made again by the next embedding request)")

    @staticmethod
    def _answer_embed(job: EmbedJob, result: EmbedResult | MeshError) -> None:
        try:
            job.on_done(result)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("result handler of embedding request %s failed", job.request_id)

    def _take_admissible(self) -> list[Submission]:
        free = self.config.n_slots - self._running
        subs = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
        self._running += len(subs)
        return subs

    def _admit(self, sub: Submission) -> None:
        r = self._runner
        free = [FreeSlot(i, r.cached[i], r.freed_at[i]) for i, a in enumerate(r.slots)
                if a is None]
        spot = place(free, sub.prompt, self.config.prefix_reuse)
        reuse = r.trim(spot.index, spot.reuse)
        r.seat(spot.index, Active(sub, reuse, r.next_admission(), self._backend.piece,
                                  self._backend.is_eog))
        self._counters.prompt_cached += reuse

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            final = isinstance(ev, Finished | Failed)
            with self._cond:
                sink = (self._sinks.pop(ev.request_id, None) if final
                        else self._sinks.get(ev.request_id))
                self._running = sum(a is not None for a in self._runner.slots)
            if sink is None:
                continue
            try:
                sink(ev)
            except Exception:  # a broken consumer must not stop the other streams
                log.exception("event handler of request %s failed", ev.request_id)

    def run_forever(self) -> None:
        """The engine loop; returns after stop()."""
        while True:
            with self._cond:
                while not (self._stopping or self._queue or self._dropped or self._running
                           or self._embeds):
                    idle_s = self.config.embed_idle_s if self._embedder else None
                    if not self._cond.wait(idle_s):  # nothing for idle_s: free the context
                        self.release_embedder()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # fail the running requests, keep serving new ones
                log.exception("engine step failed")
                events: list[Event] = []
                self._runner.fail_all(exc, events)
                self._dispatch(events)
        self._shutdown()

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run_forever, name="batch-engine",
                                        daemon=True)
        self._thread.start()
        # The grammar tokenizer takes a second or two: build it before the first request
        # with a grammar needs it, off the engine thread.
        threading.Thread(target=self.grammars.warm_up, name="grammar-warm-up",
                         daemon=True).start()
        return self._thread

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _shutdown(self) -> None:
        events: list[Event] = []
        with self._cond:
            subs, self._queue = list(self._queue), deque()
            embeds, self._embeds = list(self._embeds), deque()
        for job in embeds:
            self._answer_embed(job, EngineStopped("the engine shut down"))
        self.release_embedder()
        for sub in subs:
            events.append(Failed(sub.request_id, EngineStopped("the engine shut down")))
        self._runner.fail_all(EngineStopped("the engine shut down"), events)
        self._dispatch(events)
