"""BatchEngine: continuous batching over a llama.cpp model with n_slots sequences.

Each step feeds llama_decode one token (plus drafts) of every generating slot and bounded
chunks of new prompts; requests join between steps and leave when done. The slots form
`groups` groups (groups.py), one llama.cpp context each: one by default; a split's head
over slow links runs several, each stepping on its own thread under `run_forever`.
`submit` and `cancel` are thread-safe; `step` (every group in turn) and `run_forever`
belong to the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from meshllm.common.errors import InvalidGenerateRequest, MeshError
from meshllm.common.types import ChatMessage, Grammar, Resume, SamplingParams
from meshllm.worker.engine.batch.backend import Backend, LlamaBackend
from meshllm.worker.engine.batch.config import BatchConfig
from meshllm.worker.engine.batch.draft import Drafter, make_drafter
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
from meshllm.worker.engine.batch.groups import (
    Group,
    assignment,
    claimable,
    make_groups,
    total,
)
from meshllm.worker.engine.batch.logprobs import MAX_TOP_LOGPROBS
from meshllm.worker.engine.batch.prompt import PromptBuilder
from meshllm.worker.engine.batch.request import RequestLimits, Submission, checked_submission

log = logging.getLogger(__name__)


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
        self._groups = make_groups(config, self._backend, drafter, clock)
        self._cond = threading.Condition()
        self._queue: deque[Submission] = deque()
        self._sinks: dict[str, OnEvent] = {}  # every queued or running request
        self._where: dict[str, int] = {}  # running request -> its group
        self._dropped: list[Event] = []  # events for requests that never reached a slot
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
        limits = RequestLimits(self.config.n_ctx_slot, getattr(self._backend, "n_vocab", 0),
                               self.config.seed)
        sub = checked_submission(limits, request_id, prompt_tokens, sampling, on_event, stops,
                                 resume)
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
            running = self._running
            if running + waiting >= self.config.n_slots + self.config.max_queue:
                raise QueueFull(running, waiting, self.config.max_queue)
            self._queue.append(sub)
            self._sinks[request_id] = on_event
            self._cond.notify_all()

    @contextlib.contextmanager
    def burst(self) -> Iterator[None]:
        """Requests submitted inside join together, at the same step boundary, as if they
        had come at once (the benchmarks' concurrent streams): the engine's threads wait to
        take any until the block ends."""
        with self._cond:  # reentrant: submit takes it again
            yield

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
                g = self._where.get(request_id)
                if g is not None:  # else its final event is on its way
                    self._groups[g].cancelled.add(request_id)
            self._cond.notify_all()
            return True

    def set_link_rtt(self, rtt_s: float) -> None:
        """The split's links changed: the draft tuner takes `rtt_s` (a step's round trips
        to the stages) from the next step on; any thread."""
        with self._cond:
            for group in self._groups:
                group.pending_rtt_s = usable_rtt_s(rtt_s)

    @property
    def link_rtt_s(self) -> float:
        """The round trip the draft tuner uses (or will from the next step)."""
        first = self._groups[0]
        with self._cond:
            pending = first.pending_rtt_s
        return first.runner.link_rtt_s if pending is None else pending

    @property
    def _running(self) -> int:
        """Requests in a slot (under the lock)."""
        return sum(g.load for g in self._groups)

    def stats(self) -> EngineStats:
        c = total([g.counters for g in self._groups])
        with self._cond:
            running, queued = self._running, len(self._queue)
        return EngineStats(running, queued, self.config.max_queue, self.config.n_slots,
                           c.steps, c.seq_steps, c.generated, c.prompt_processed,
                           c.prompt_cached, c.drafted, c.accepted,
                           round(self.link_rtt_s * 1e6))

    # --- engine thread -------------------------------------------------------------

    def step(self) -> bool:
        """One step of every group in turn, then of embeddings; returns False when there was
        nothing to do. (run_forever steps each group on its own thread instead.)"""
        did = False
        for g in range(len(self._groups)):
            did = self._group_step(g) or did
        return self._embed_step() or did

    def _group_step(self, g: int) -> bool:
        group = self._groups[g]
        with self._cond:
            subs = self._take_admissible(g)
            cancelled, group.cancelled = group.cancelled, set()
            events: list[Event] = []
            if g == 0:
                events, self._dropped = self._dropped, []
            rtt_s, group.pending_rtt_s = group.pending_rtt_s, None
        if rtt_s is not None:  # the runner and its tuner belong to the group's thread
            group.runner.link_rtt_s = rtt_s
        for sub in subs:
            group.counters.prompt_cached += group.seat(sub, self.config.prefix_reuse)
        did = group.runner.run(cancelled, events) or bool(subs)
        self._dispatch(group, events)
        return did or bool(events)

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

    def _take_admissible(self, g: int) -> list[Submission]:
        """The queued requests that join group g now (under the lock); one meant for
        another group waits in the queue for that group's next step."""
        picks = assignment(self._groups, self._queue, self.config.prefix_reuse)
        taken = [sub for sub, pick in picks if pick == g]
        for sub in taken:
            self._queue.remove(sub)
            self._where[sub.request_id] = g
        self._groups[g].load += len(taken)
        if taken and len(self._groups) > 1:
            self._cond.notify_all()  # the loads changed: so may the others' picks
        return taken

    def _dispatch(self, group: Group, events: list[Event]) -> None:
        load = sum(a is not None for a in group.runner.slots)
        if load != group.load and len(self._groups) > 1:  # a slot was freed
            group.publish_free()
        with self._cond:
            for ev in events:
                if isinstance(ev, Finished | Failed):
                    self._where.pop(ev.request_id, None)
            if load != group.load:  # room for a queued request: wake whoever takes it
                group.load = load
                self._cond.notify_all()
        for ev in events:
            final = isinstance(ev, Finished | Failed)
            with self._cond:
                sink = (self._sinks.pop(ev.request_id, None) if final
                        else self._sinks.get(ev.request_id))
            if sink is None:
                continue
            try:
                sink(ev)
            except Exception:  # a broken consumer must not stop the other streams
                log.exception("event handler of request %s failed", ev.request_id)

    def run_forever(self) -> None:
        """The engine loop, one thread per group (the first is this one); returns after
        stop()."""
        others = [threading.Thread(target=self._group_loop, args=(g,), daemon=True,
                                   name=f"batch-engine-group-{g}")
                  for g in range(1, len(self._groups))]
        for thread in others:
            thread.start()
        self._group_loop(0)
        for thread in others:
            thread.join()
        self._shutdown()

    def _has_work(self, g: int) -> bool:
        group = self._groups[g]
        reuse = self.config.prefix_reuse
        if group.load or group.cancelled or claimable(self._groups, self._queue, g, reuse):
            return True
        return g == 0 and bool(self._dropped or self._embeds)

    def _group_loop(self, g: int) -> None:
        group = self._groups[g]
        while True:
            with self._cond:
                while not (self._stopping or self._has_work(g)):
                    idle_s = self.config.embed_idle_s if g == 0 and self._embedder else None
                    if not self._cond.wait(idle_s):  # nothing for idle_s: free the context
                        self.release_embedder()
                if self._stopping:
                    break
            try:
                self._group_step(g)
                if g == 0:  # after the streams' step: they never wait on two
                    self._embed_step()
            except Exception as exc:  # fail the group's requests, keep serving new ones
                log.exception("engine step failed")
                events: list[Event] = []
                group.runner.fail_all(exc, events)
                self._dispatch(group, events)

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
        self._dispatch(self._groups[0], events)
        for group in self._groups:
            failed: list[Event] = []
            group.runner.fail_all(EngineStopped("the engine shut down"), failed)
            self._dispatch(group, failed)
