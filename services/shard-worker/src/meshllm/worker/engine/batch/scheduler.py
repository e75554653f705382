"""What one engine step feeds to llama_decode: a pure function of the slots' state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotState:
    index: int
    prompt_left: int  # prompt tokens not yet in the KV; 0: the slot is generating
    drafts: int = 0  # drafted tokens to verify this step (generating slots)
    admitted: int = 0  # admission order: earlier prompts are processed first


@dataclass(frozen=True)
class StepPlan:
    decode: tuple[int, ...]  # generating slots: their last token (+ drafts) this step
    prefill: tuple[tuple[int, int], ...]  # (slot, prompt tokens) chunks this step

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


def plan_step(slots: Sequence[SlotState], n_batch: int, prefill_chunk: int) -> StepPlan:
    """Every generating slot advances each step; prompts share a bounded chunk budget so a
    long prompt cannot stall the running streams. With nothing generating the whole batch
    goes to prompts, since there is no stream to keep flowing."""
    decoding = [s for s in slots if s.prompt_left == 0]
    used = sum(1 + s.drafts for s in decoding)
    budget = n_batch - used
    if decoding:
        budget = min(budget, prefill_chunk)
    prefill: list[tuple[int, int]] = []
    for s in sorted((s for s in slots if s.prompt_left > 0), key=lambda s: s.admitted):
        if budget <= 0:
            break
        n = min(s.prompt_left, budget)
        prefill.append((s.index, n))
        budget -= n
    return StepPlan(tuple(s.index for s in decoding), tuple(prefill))


def draft_budget(draft_max: int, remaining: int, room: int) -> int:
    """Drafts worth verifying: none past the request's token limit or the slot's context.

    `remaining`: tokens the request may still produce; `room`: free KV cells of the slot.
    A step emits up to drafts + 1 tokens and writes drafts + 1 cells.
    """
    return max(0, min(draft_max, remaining - 1, room - 1))
