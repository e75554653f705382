"""The work of one engine step: cancel, draft, decode one mixed batch, sample, emit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshllm.worker.engine.batch.backend import Backend
from meshllm.worker.engine.batch.config import BatchConfig
from meshllm.worker.engine.batch.draft import Drafter, ShadowDrafts
from meshllm.worker.engine.batch.draft_tuning import (
    BLIND_ACCEPTANCE,
    PRIOR_ACCEPTANCE,
    Acceptance,
    DraftTuner,
    recent_acceptance,
    usable_rtt_s,
)
from meshllm.worker.engine.batch.errors import engine_error
from meshllm.worker.engine.batch.events import Event, Failed
from meshllm.worker.engine.batch.request import Active
from meshllm.worker.engine.batch.sampling import Logits
from meshllm.worker.engine.batch.scheduler import (
    SlotState,
    StepPlan,
    draft_budget,
    plan_step,
)
from meshllm.worker.engine.batch.speculative import Verdict
from meshllm.worker.engine.batch.ubatch import (
    count_ubatches,
    cut_drafts,
    gap_fillers,
    padded_drafts,
)

log = logging.getLogger(__name__)

# What pads a draft (ubatch.padded_drafts): any token is a guess that greedy verification
# keeps only where the target picks it itself, so its value never changes output.
PAD_TOKEN = 0


@dataclass
class Counters:
    """Monotonic totals, written by the engine thread only (ints: torn reads cannot occur)."""

    steps: int = 0
    seq_steps: int = 0
    generated: int = 0
    prompt_processed: int = 0
    prompt_cached: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class Batch:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    outputs: list[bool] = field(default_factory=list)

    def add(self, seq: int, tokens: Sequence[int], start: int, outputs: Sequence[bool]) -> None:
        self.tokens += tokens
        self.positions += range(start, start + len(tokens))
        self.seqs += [seq] * len(tokens)
        self.outputs += outputs


class StepRunner:
    def __init__(self, config: BatchConfig, backend: Backend, drafter: Drafter | None,
                 counters: Counters, clock: Callable[[], float] = time.perf_counter,
                 busy_elsewhere: Callable[[], bool] | None = None) -> None:
        self.config = config
        self._clock = clock  # what the draft tuner times steps with
        self.slots: list[Active | None] = [None] * config.n_slots
        self.cached: list[list[int]] = [[] for _ in range(config.n_slots)]  # tokens in KV
        self.freed_at: list[int] = [0] * config.n_slots
        self._b, self._drafter, self._c = backend, drafter, counters
        self._admissions = 0
        free = drafter is not None and drafter.free
        # Two tuners: while other groups of the engine (groups.py) are busy, a step's wall
        # time holds their work too, queued on the same stages and cores; fitted into the
        # costs of a quiet step, it would make rows look dear when this group runs alone.
        self.tuners = tuple(DraftTuner(usable_rtt_s(config.link_rtt_s), config.draft_max,
                                       probing=not free) for _ in range(2))
        self._tuner = self.tuners[0]
        self._busy_elsewhere = busy_elsewhere or (lambda: False)
        self._shadows = ShadowDrafts() if free else None
        self._recent = PRIOR_ACCEPTANCE  # every request's drafts, lately (recent_acceptance)
        self._padding: dict[int, int] = {}  # slot -> filler tokens at its draft's end

    @property
    def link_rtt_s(self) -> float:
        return self._tuner.rtt_s

    @link_rtt_s.setter
    def link_rtt_s(self, rtt_s: float) -> None:
        for tuner in self.tuners:
            tuner.rtt_s = rtt_s

    def seat(self, slot: int, active: Active) -> None:
        """Puts an admitted request in its slot. Its drafts start from the acceptance the
        engine saw lately, which the request's own evidence soon outweighs."""
        active.acceptance = Acceptance(prior=self._recent)
        self.slots[slot] = active

    def next_admission(self) -> int:
        self._admissions += 1
        return self._admissions

    def trim(self, slot: int, keep: int) -> int:
        """Keeps the slot's first `keep` cached tokens; returns how many were kept."""
        if keep < len(self.cached[slot]) and not self._b.seq_rm(slot, keep):
            self._b.seq_rm(slot, -1)  # this cache cannot cut a sequence there: drop it all
            keep = 0
        del self.cached[slot][keep:]
        return keep

    def run(self, cancelled: set[str], out: list[Event]) -> bool:
        for i, a in enumerate(self.slots):
            if a is not None and a.sub.request_id in cancelled:
                a.finish("cancelled", out)
                self._free(i)
        self._tuner = self.tuners[1 if self._busy_elsewhere() else 0]
        drafts = self._drafts()
        plan = plan_step([SlotState(i, a.prompt_left, len(drafts.get(i, ())), a.admitted)
                          for i, a in enumerate(self.slots) if a is not None],
                         self.config.n_batch, self.config.prefill_chunk)
        if plan.empty:
            return False
        fillers = self._fillers(plan, drafts)
        batch = self._build(plan, drafts, fillers)
        started = self._clock()
        try:
            rows = self._b.decode(batch.tokens, batch.positions, batch.seqs, batch.outputs)
        except Exception as exc:
            self.fail_all(exc, out)
            for i in fillers:
                self.trim(i, 0)
            return True
        for i in fillers:  # placeholders leave the slot's cache as it was
            self.trim(i, len(self.cached[i]) - fillers[i])
        self._c.steps += 1
        wall_s = self._clock() - started
        self._consume(plan, drafts, rows, out)
        if self._drafter is not None and not plan.prefill:
            self._tuner.observe(wall_s, len(batch.tokens), self._passes(plan, drafts, fillers))
        return True

    def _drafts(self) -> dict[int, list[int]]:
        self._padding = {}
        if self._drafter is None:
            return {}
        wants: dict[int, tuple[list[int], int]] = {}
        shadows: dict[int, tuple[list[int], int]] = {}  # free guesses, scored, not verified
        caps: dict[int, int] = {}  # greedy slots: the most drafts they may verify
        seqs = sum(a is not None for a in self.slots)
        for i in self._decoding():
            a = self._active(i)
            room = self.config.n_ctx_slot - len(self.cached[i])
            if a.sub.spec.greedy:
                caps[i] = draft_budget(self.config.draft_max, a.remaining, room)
            # No draft changes any request's output (speculative.py): each gets the length
            # its own acceptance calls for. Padding stays greedy-only (caps), as proven.
            # Before a request's own text has told anything, the engine's prior (other
            # requests' text) may be wrong: a free drafter's first real draft is at most
            # what a coin-flip acceptance pays for (none where rows are dear against the
            # round trip: its guesses are shadows until one is scored).
            value = a.acceptance.value
            if not a.acceptance.seen and self._shadows is not None:
                value = min(value, BLIND_ACCEPTANCE)
            length = self._tuner.length(seqs, value)
            k = draft_budget(length, a.remaining, room)
            if k > 0:
                wants[i] = (a.history(), k)
            elif not length and self._shadows is not None and self._shadows.idle(i):
                shadows[i] = (a.history(), self.config.draft_max)
        proposed = self._drafter.propose(wants | shadows) if wants or shadows else {}
        if self._shadows is not None:
            for i in shadows:
                self._shadows.start(i, proposed.get(i, []))
        drafts = {i: d[: wants[i][1]] for i, d in proposed.items() if d and i in wants}
        # Padded as far as the caps let, then cut to what one ubatch holds.
        return self._cut(self._pad(drafts, caps) if self.config.pad_drafts else drafts)

    def _decoding(self) -> list[int]:
        return [i for i, a in enumerate(self.slots)
                if a is not None and not a.prompt_left and a.generated]

    def _cut(self, drafts: dict[int, list[int]]) -> dict[int, list[int]]:
        """Drafts cut to a common length when the ubatches that saves are worth more than
        the tokens it gives up (ubatch.cut_drafts)."""
        decoding, t = self._decoding(), self._tuner
        if len(decoding) < 2 or not drafts:
            return drafts
        lengths = {i: len(drafts.get(i, ())) for i in decoding}
        acceptance = {i: self._active(i).acceptance.value for i in decoding}
        cut = cut_drafts(lengths, acceptance, t.row_s, t.rtt_s + t.pass_s)
        for i, pad in list(self._padding.items()):  # what is left of a padded draft's tail
            self._padding[i] = max(0, cut[i] - (lengths[i] - pad))
        return {i: drafts[i][:n] for i, n in cut.items() if n}

    def _pad(self, drafts: dict[int, list[int]], caps: dict[int, int]
             ) -> dict[int, list[int]]:
        """Drafts padded to fewer ubatches when that is cheaper (ubatch.padded_drafts)."""
        decoding, t = self._decoding(), self._tuner
        if len(decoding) < 2 or not drafts:
            return drafts
        lengths = {i: len(drafts.get(i, ())) for i in decoding}
        padded = padded_drafts(lengths, caps, t.row_s, t.rtt_s + t.pass_s + t.row_s)
        out = dict(drafts)
        for i, n in padded.items():
            if n > lengths[i]:
                out[i] = [*drafts.get(i, ()), *[PAD_TOKEN] * (n - lengths[i])]
                self._padding[i] = n - lengths[i]
        return out

    def _passes(self, plan: StepPlan, drafts: dict[int, list[int]],
                fillers: dict[int, int]) -> int:
        """The ubatches llama.cpp made of a decode-only step (ubatch.count_ubatches)."""
        rows = [0] * self.config.n_slots
        for i in plan.decode:
            rows[i] = 1 + len(drafts.get(i, ()))
        for i, n in fillers.items():
            rows[i] = n
        return count_ubatches(rows)

    def _fillers(self, plan: StepPlan, drafts: dict[int, list[int]]) -> dict[int, int]:
        """Placeholder rows in idle slots that join the decodes into one ubatch (ubatch.py)."""
        rows = {i: 1 + len(drafts.get(i, ())) for i in plan.decode}
        room = self.config.n_ctx_slot - max(rows.values(), default=0)
        idle = [i for i, a in enumerate(self.slots) if a is None and len(self.cached[i]) < room]
        return gap_fillers(rows, idle, sum(rows.values()))

    def _build(self, plan: StepPlan, drafts: dict[int, list[int]],
               fillers: dict[int, int]) -> Batch:
        batch = Batch()
        for i in sorted((*plan.decode, *fillers)):  # ascending ids: one ubatch (ubatch.py)
            if i in fillers:
                batch.add(i, [0] * fillers[i], len(self.cached[i]), [False] * fillers[i])
                self.cached[i] += [0] * fillers[i]
                continue
            a = self._active(i)
            inputs = [a.generated[-1], *drafts.get(i, ())]
            batch.add(i, inputs, len(self.cached[i]), [True] * len(inputs))
        for i, n in plan.prefill:
            a = self._active(i)
            chunk = a.sub.prompt[a.done:a.done + n]
            last = a.done + n == len(a.sub.prompt)
            batch.add(i, chunk, a.done, [False] * (n - 1) + [last])
        return batch

    def _consume(self, plan: StepPlan, drafts: dict[int, list[int]], rows: list[Logits],
                 out: list[Event]) -> None:
        r = 0
        for i in plan.decode:
            d = drafts.get(i, [])
            self._advance(i, d, rows[r:r + len(d) + 1], out)
            r += len(d) + 1
        for i, n in plan.prefill:
            a = self._active(i)
            self.cached[i] += a.sub.prompt[a.done:a.done + n]
            a.done += n
            self._c.prompt_processed += n
            if a.prompt_left == 0:
                self._emit(i, (a.picker.pick(rows[r], self._history(a)),), out)
                r += 1

    def _advance(self, i: int, draft: list[int], rows: list[Logits], out: list[Event]) -> None:
        a = self._active(i)
        base = len(self.cached[i])
        self.cached[i] += [a.generated[-1], *draft]
        verdict = self._verify(a, draft, rows)
        real = len(draft) - self._padding.get(i, 0)  # drafted, not padding
        kept = min(verdict.accepted, real)
        if verdict.accepted < len(draft):
            self.trim(i, base + 1 + verdict.accepted)
        if real:  # a cut in the padding says nothing about the drafter: not a rejection
            self._learn(a, kept, verdict.accepted < real)
        self._c.seq_steps += 1
        self._c.drafted += real
        self._c.accepted += kept
        self._score_shadow(a, i, draft, verdict.tokens)
        self._emit(i, verdict.tokens, out)

    def _score_shadow(self, a: Active, i: int, draft: list[int], tokens: Sequence[int]) -> None:
        if self._shadows is None:
            return
        if draft:  # verified for real: the shadow's guess is stale
            self._shadows.drop(i)
            return
        self._learn(a, *self._shadows.emitted(i, tokens))

    def _learn(self, a: Active, kept: int, cut: int | bool) -> None:
        a.acceptance.update(kept, cut)
        self._recent = recent_acceptance(self._recent, kept, cut)

    @staticmethod
    def _history(a: Active) -> Sequence[int]:
        """What penalties look at; nothing when the request has none."""
        return () if a.sub.spec.plain_logits else a.history()

    def _verify(self, a: Active, draft: list[int], rows: list[Logits]) -> Verdict:
        return a.picker.verify(draft, rows, self._history(a))

    def _emit(self, i: int, tokens: Sequence[int], out: list[Event]) -> None:
        a = self._active(i)
        self._c.generated += a.emit(tokens, out, a.picker.take_entries(),
                                    a.picker.take_marks())
        if a.reason is not None:
            a.finish(a.reason, out)
            self._free(i)

    def _active(self, i: int) -> Active:
        a = self.slots[i]
        assert a is not None, f"slot {i} is empty"
        return a

    def _free(self, i: int) -> None:
        self.slots[i] = None
        if self._shadows is not None:
            self._shadows.drop(i)
        self.freed_at[i] = self._c.steps

    def fail_all(self, exc: BaseException, out: list[Event]) -> None:
        """Fails every running request and forgets their KV, whose state is unknown now."""
        for i, a in enumerate(self.slots):
            if a is not None:
                out.append(Failed(a.sub.request_id, engine_error(exc)))
                self._free(i)
                self.trim(i, 0)
