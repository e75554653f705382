"""Which free slot a new request takes, so that a prompt sharing a prefix with a slot's
cached tokens (a chat that goes on) skips re-processing that prefix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FreeSlot:
    index: int
    cached: Sequence[int]  # tokens whose KV is still in the slot's sequence
    last_used: int  # engine step when the slot was last freed (older: reuse first)


@dataclass(frozen=True)
class Placement:
    index: int
    reuse: int  # prompt tokens already in the slot's KV


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def place(free: Sequence[FreeSlot], prompt: Sequence[int], enabled: bool = True) -> Placement:
    """The free slot sharing the longest prefix; ties go to the least recently used slot.

    At least the prompt's last token is always evaluated again: its logits give the first
    output token, and logits are not kept with the KV.
    """
    if not free:
        raise ValueError("place() needs at least one free slot")

    def reuse(slot: FreeSlot) -> int:
        return min(common_prefix(slot.cached, prompt), len(prompt) - 1) if enabled else 0

    best = min(free, key=lambda s: (-reuse(s), s.last_used, s.index))
    return Placement(best.index, max(0, reuse(best)))
