"""Post ids: ULIDs (48-bit creation time in ms, then 80 random bits, Crockford base32).

They sort by creation time as plain strings and need no coordination between nodes:
80 random bits make a collision between two nodes negligible.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from meshllm.common.blackboard.types import PostId

# Crockford base32, as ULIDs use: sortable, no ambiguous letters (I, L, O, U).
ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_RANDOM_BITS = 80
_MAX_TIME_MS = (1 << 48) - 1


def ulid_time_ms(post_id: str) -> int:
    """The creation time encoded in the first 10 characters of a ULID."""
    value = 0
    for char in post_id[:10]:
        value = value * 32 + ULID_ALPHABET.index(char)
    return value


def is_post_id(text: str) -> bool:
    return bool(_ULID.match(text)) and text[0] <= "7"  # 48-bit time: first char <= 7


def encode_ulid(time_ms: int, randomness: int) -> PostId:
    if not 0 <= time_ms <= _MAX_TIME_MS or not 0 <= randomness < (1 << _RANDOM_BITS):
        raise ValueError(f"ULID parts out of range: time {time_ms}, randomness {randomness}")
    value = (time_ms << _RANDOM_BITS) | randomness
    chars = []
    for _ in range(26):
        chars.append(ULID_ALPHABET[value & 31])
        value >>= 5
    return PostId("".join(reversed(chars)))


class IdGenerator:
    """Monotonic within one node: ids made in the same millisecond (or after the clock
    stepped back) still sort in the order they were made."""

    def __init__(self, random_bits: Callable[[int], int] = secrets.randbits) -> None:
        self._random_bits = random_bits
        self._last_ms = -1
        self._last_random = 0

    def next(self, now_ms: int) -> tuple[PostId, int]:
        """A new id and the creation time it encodes (>= every earlier one)."""
        if now_ms > self._last_ms:
            self._last_ms, self._last_random = now_ms, self._random_bits(_RANDOM_BITS - 1)
        elif self._last_random + 1 < (1 << _RANDOM_BITS):
            self._last_random += 1
        else:
            self._last_ms, self._last_random = self._last_ms + 1, 0
        return encode_ulid(self._last_ms, self._last_random), self._last_ms
