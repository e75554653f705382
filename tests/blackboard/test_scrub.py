"""The scrubber, table-driven: what is refused, what is redacted, what passes untouched."""

from __future__ import annotations

import pytest
from meshllm.blackboard.scrub import looks_random, scrub

REFUSED = [
    ("openai key", "use sk-proj-abcdefghijklmnop1234 for it", "api-key"),
    ("github token", "token ghp_0123456789abcdefghijABCDEFGHIJ0123", "github-token"),
    ("github pat", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github-token"),
    ("aws key id", "AKIAIOSFODNN7EXAMPLE is the id", "aws-access-key"),
    ("slack", "xoxb-123456789012-abcdefghij", "slack-token"),
    ("pem", "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----",
     "pem-block"),
    ("pem without end", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
     "pem-block"),
    ("jwt", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
     "jwt"),
    ("aws secret", "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "high-entropy-string"),
    ("random token", "pass Zx9qL2mN8pR4tV6wY1bC3dF5gH7jK0", "high-entropy-string"),
]

REDACTED = [
    ("email", "write to bob.smith@example.co.uk please", "write to [email] please", "email"),
    ("linux home", "log in /home/alice/work/mesh/run.log", "log in ~/work/mesh/run.log",
     "home-path"),
    ("mac home", "see /Users/bob/src", "see ~/src", "home-path"),
    ("windows home", r"at C:\Users\carol\repo", r"at ~\repo", "home-path"),
    ("root home", "in /root/.cache", "in ~/.cache", "home-path"),
]

UNTOUCHED = [
    "planner placed gemma3-270m on worker-2, layers 0-17",
    "commit 3f2a9c1e4b5d6f7a8b9c0d1e2f3a4b5c6d7e8f90 fixes it",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "test_blackboard_three_nodes_converge_after_restart failed once",
    "MeshLlmBlackboardServiceGossipPeerLinkManager2 is too long a name",
    "/usr/lib/python3/dist-packages/grpc_tools/protoc",
    "the sk- prefix alone is fine, as is task-1234",
]


@pytest.mark.parametrize(("name", "text", "finding"), REFUSED, ids=[r[0] for r in REFUSED])
def test_credentials_are_refused_by_default(name: str, text: str, finding: str) -> None:
    result = scrub(text)
    assert finding in result.refused


@pytest.mark.parametrize(("name", "text", "finding"), REFUSED, ids=[r[0] for r in REFUSED])
def test_credentials_can_be_redacted_instead(name: str, text: str, finding: str) -> None:
    result = scrub(text, redact_credentials=True)
    assert not result.refused
    assert finding in result.redacted
    assert f"[redacted:{finding}]" in result.text


@pytest.mark.parametrize(("name", "text", "expected", "finding"), REDACTED,
                         ids=[r[0] for r in REDACTED])
def test_personal_data_is_redacted(name: str, text: str, expected: str, finding: str) -> None:
    result = scrub(text)
    assert (result.text, result.redacted, result.refused) == (expected, (finding,), ())


@pytest.mark.parametrize("text", UNTOUCHED)
def test_ordinary_text_passes_untouched(text: str) -> None:
    assert scrub(text).text == text
    assert not scrub(text).refused


@pytest.mark.parametrize(("token", "random"), [
    ("Zx9qL2mN8pR4tV6wY1bC3dF5gH7jK0", True),
    ("aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ", True),
    ("0123456789abcdef0123456789abcdef", False),   # hex: a digest
    ("ERR_CONNECTION_REFUSED_WHILE_DIALING", False),
    ("/var/lib/mesh/blackboard/data/xyz", False),
])
def test_looks_random(token: str, random: bool) -> None:
    assert looks_random(token) is random


def test_one_key_is_reported_once() -> None:
    assert scrub("key sk-abcdefghijklmnopqrstuvwxyz0123456789ABCD").refused == ("api-key",)
