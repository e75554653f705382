"""Prompt-lookup drafting: if the latest n tokens occurred before, propose what followed.

Costs no model at all and pays off when the output repeats its context (code edits,
quoting, summaries of a given text).
"""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(history: Sequence[int], n_max: int, n_min: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram (n from n_max down to n_min) of `history`."""
    if k <= 0:
        return []
    size = len(history)
    for n in range(n_max, n_min - 1, -1):
        if size <= n:
            continue
        key = list(history[size - n:])
        # Newest first: the latest repetition is the best guess of what comes next.
        for start in range(size - n - 1, -1, -1):
            if history[start] == key[0] and list(history[start:start + n]) == key:
                return list(history[start + n:start + n + k])
    return []
