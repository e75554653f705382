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


# A slot counts as holding this prompt's prefix only when it shares at least this share of
# the prompt (llama-server's --slot-prompt-similarity): every chat shares the template's
# first tokens, and taking another conversation's slot for those would throw its cache away
# while an unused or older slot is free.
MIN_SHARED = 0.5


def reusable(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """The prompt tokens a slot holding `cached` counts as sharing: at least MIN_SHARED of
    the prompt, and never its last token (see place)."""
    shared = min(common_prefix(cached, prompt), len(prompt) - 1)
    return shared if shared >= MIN_SHARED * len(prompt) else 0


def place(free: Sequence[FreeSlot], prompt: Sequence[int], enabled: bool = True) -> Placement:
    """The free slot sharing the longest prefix (at least MIN_SHARED of the prompt), else
    the least recently used slot; ties go to the least recently used.

    At least the prompt's last token is always evaluated again: its logits give the first
    output token, and logits are not kept with the KV.
    """
    if not free:
        raise ValueError("place() needs at least one free slot")
    best = min(free, key=lambda s: (-(reusable(s.cached, prompt) if enabled else 0),
                                    s.last_used, s.index))
    reused = min(common_prefix(best.cached, prompt), len(prompt) - 1) if enabled else 0
    return Placement(best.index, max(0, reused))
