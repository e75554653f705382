"""The secret scrubber: what a post must not carry off its node.

Credentials (API keys, tokens, PEM blocks, high-entropy strings) are refused by default,
because a redacted key is still a leaked key the author must rotate and should hear
about; with `redact_credentials` they are replaced instead. Personal data (e-mail
addresses, home-directory paths) is always replaced: the post stays useful without it.
Everything here is a pure function of the text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

CREDENTIAL = "credential"
PERSONAL = "personal"


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str  # CREDENTIAL or PERSONAL
    pattern: re.Pattern[str]
    replacement: str


RULES: tuple[Rule, ...] = (
    Rule("pem-block", CREDENTIAL, re.compile(
        r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.DOTALL),
        "[redacted:pem-block]"),
    Rule("api-key", CREDENTIAL, re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), "[redacted:api-key]"),
    Rule("github-token", CREDENTIAL, re.compile(
        r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
        "[redacted:github-token]"),
    Rule("aws-access-key", CREDENTIAL, re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
         "[redacted:aws-access-key]"),
    Rule("slack-token", CREDENTIAL, re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"),
         "[redacted:slack-token]"),
    Rule("jwt", CREDENTIAL, re.compile(
        r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"), "[redacted:jwt]"),
    Rule("email", PERSONAL, re.compile(
        r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"), "[email]"),
    # The user name is the personal part; the rest of the path is usually what matters.
    Rule("home-path", PERSONAL, re.compile(
        r"(?:/home/[^/\s]+|/Users/[^/\s]+|[A-Za-z]:\\Users\\[^\\\s]+|/root(?=/|\s|$))"), "~"),
)

# A token this long, mixing letters and digits, with this much Shannon entropy per
# character, is more likely a key than a word. Hex-only strings are let through: commit
# ids and digests are common in agents' posts and are not secrets.
_CANDIDATE = re.compile(r"[A-Za-z0-9+/=_\-]{24,}")
_HEX_ONLY = re.compile(r"^[0-9a-fA-F\-]+$")
# Runs that read like words: identifiers such as MeshLlmGossipPeerLink2 have as much
# per-character entropy as a key, but most of their characters sit in such runs.
_WORDLIKE = re.compile(r"[A-Z]?[a-z]{3,}")
MAX_WORDLIKE_FRACTION = 0.5
MIN_ENTROPY_BITS_PER_CHAR = 4.0
HIGH_ENTROPY = Rule("high-entropy-string", CREDENTIAL, _CANDIDATE, "[redacted:high-entropy-string]")


@dataclass(frozen=True)
class Scrubbed:
    text: str
    redacted: tuple[str, ...]  # rule names whose matches were replaced
    refused: tuple[str, ...]   # rule names that make the post unacceptable


def shannon_bits_per_char(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def looks_random(token: str) -> bool:
    if _HEX_ONLY.match(token) or token.startswith("/"):
        return False  # digests, uuids and paths
    wordlike = sum(len(m) for m in _WORDLIKE.findall(token))
    if wordlike / len(token) >= MAX_WORDLIKE_FRACTION:
        return False
    has_letter = any(c.isalpha() for c in token)
    has_digit = any(c.isdigit() for c in token)
    mixed_case = token.lower() != token and token.upper() != token
    return has_letter and (has_digit or mixed_case) and (
        shannon_bits_per_char(token) >= MIN_ENTROPY_BITS_PER_CHAR
    )


def _apply(rule: Rule, text: str) -> tuple[str, bool]:
    if rule is HIGH_ENTROPY:
        found = False

        def replace(match: re.Match[str]) -> str:
            nonlocal found
            if looks_random(match.group(0)):
                found = True
                return rule.replacement
            return match.group(0)

        return rule.pattern.sub(replace, text), found
    new_text, n = rule.pattern.subn(rule.replacement, text)
    return new_text, n > 0


def scrub(text: str, redact_credentials: bool = False) -> Scrubbed:
    """Replace what may be replaced; name what must refuse the post."""
    redacted: list[str] = []
    refused: list[str] = []
    for rule in (*RULES, HIGH_ENTROPY):
        # Credentials are replaced even when refusing, so that later rules (high
        # entropy) do not report the same key twice.
        text, found = _apply(rule, text)
        if not found:
            continue
        if rule.kind == CREDENTIAL and not redact_credentials:
            refused.append(rule.name)
        else:
            redacted.append(rule.name)
    return Scrubbed(text, tuple(redacted), tuple(refused))
