"""Drafters for speculative decoding. Both are deterministic: a draft is a guess, and the
acceptance rule (speculative.py) alone decides what the target emits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from meshllm.worker.engine.batch.backend import Backend, LlamaBackend
from meshllm.worker.engine.batch.config import BatchConfig, SpecMode
from meshllm.worker.engine.batch.load_options import LoadOptions
from meshllm.worker.engine.batch.ngram import propose_ngram
from meshllm.worker.engine.batch.prefix import common_prefix

# slot -> (its whole token history, ending with the token about to be decoded; drafts wanted)
Wants = Mapping[int, tuple[Sequence[int], int]]


class Drafter(Protocol):
    # Asking costs next to nothing (no model runs): its drafts can be checked against what
    # the target then emits without verifying them (ShadowDrafts).
    free: bool

    def propose(self, wants: Wants) -> dict[int, list[int]]: ...


class ShadowDrafts:
    """Drafts proposed but not verified, checked against the tokens their slot emits next:
    how a free drafter's acceptance is measured while drafting does not pay, so that the
    tuner sees when the text starts repeating without spending rows on probes. What a
    shadow scores is what verification would have kept (it keeps a draft while the
    target's own picks match it)."""

    def __init__(self) -> None:
        self._pending: dict[int, _Shadow] = {}

    def idle(self, slot: int) -> bool:
        return slot not in self._pending

    def start(self, slot: int, draft: Sequence[int]) -> None:
        if draft:
            self._pending[slot] = _Shadow(list(draft))

    def drop(self, slot: int) -> None:
        self._pending.pop(slot, None)

    def emitted(self, slot: int, tokens: Sequence[int]) -> tuple[int, int]:
        """Once the slot's shadow draft is over, (its tokens that matched, 1 if it was cut
        short else 0), scored as one verification would be; (0, 0) while it goes on."""
        draft = self._pending.get(slot)
        if draft is None:
            return 0, 0
        for token in tokens:
            if draft.tokens[draft.kept] != token:
                self.drop(slot)
                return draft.kept, 1
            draft.kept += 1
            if draft.kept == len(draft.tokens):
                self.drop(slot)
                return draft.kept, 0
        return 0, 0


@dataclass
class _Shadow:
    tokens: list[int]
    kept: int = 0


class NgramDrafter:
    free = True

    def __init__(self, n_max: int, n_min: int) -> None:
        self._n_max, self._n_min = n_max, n_min

    def propose(self, wants: Wants) -> dict[int, list[int]]:
        return {slot: propose_ngram(hist, self._n_max, self._n_min, k)
                for slot, (hist, k) in wants.items()}


class ModelDrafter:
    """A small model with the target's vocabulary, one sequence per slot, kept in step with
    the target's history (only the tokens it has not seen are evaluated)."""

    free = False

    def __init__(self, backend: Backend, n_slots: int, n_batch: int) -> None:
        self._b = backend
        self._n_batch = n_batch
        self._cached: list[list[int]] = [[] for _ in range(n_slots)]

    def propose(self, wants: Wants) -> dict[int, list[int]]:
        wants = {s: w for s, w in wants.items() if w[1] > 0}
        drafts = {s: [t] for s, t in self._catch_up(wants).items()}
        while True:
            growing = [s for s, d in drafts.items() if len(d) < wants[s][1]]
            if not growing:
                return drafts
            last = [drafts[s][-1] for s in growing]
            pos = [len(self._cached[s]) for s in growing]
            rows = self._b.decode(last, pos, growing, [True] * len(growing))
            for s, token, row in zip(growing, last, rows, strict=True):
                self._cached[s].append(token)
                drafts[s].append(int(np.argmax(row)))

    def _catch_up(self, wants: Wants) -> dict[int, int]:
        """Evaluates each history's unseen tail; returns the draft's next token per slot."""
        todo: list[tuple[int, int, int, bool]] = []  # (slot, token, position, last)
        for slot, (hist, _) in wants.items():
            keep = min(common_prefix(self._cached[slot], hist), len(hist) - 1)
            if keep < len(self._cached[slot]) and not self._b.seq_rm(slot, keep):
                self._b.seq_rm(slot, -1)
                keep = 0
            self._cached[slot] = list(hist)
            todo += [(slot, hist[p], p, p == len(hist) - 1) for p in range(keep, len(hist))]
        firsts: dict[int, int] = {}
        for start in range(0, len(todo), self._n_batch):
            part = todo[start:start + self._n_batch]
            rows = self._b.decode([t[1] for t in part], [t[2] for t in part],
                                  [t[0] for t in part], [t[3] for t in part])
            for (slot, *_), row in zip([t for t in part if t[3]], rows, strict=True):
                firsts[slot] = int(np.argmax(row))
        return firsts


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
