"""Typed blackboard errors. Each has a stable reason code that travels in gRPC trailing
metadata (`meshllm.common.grpc_errors`), so that the client rebuilds the same error on the
other side and the gateway, CLI and MCP server can present it (HTTP status, exit code,
tool error).

Every class takes the finished message, so a client can rebuild one from the wire; the
`for_*` constructors write the message where the rule is checked."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from meshllm.common.errors import MeshError
from meshllm.common.grpc_errors import register_status


class BlackboardError(MeshError):
    reason = "blackboard_error"


class PostRejected(BlackboardError):
    """The post breaks a rule; the message says which and how to fix it."""

    reason = "invalid_post"


class TextTooLarge(PostRejected):
    reason = "text_too_large"

    @classmethod
    def for_sizes(cls, size_bytes: int, limit_bytes: int) -> TextTooLarge:
        return cls(
            f"post text is {size_bytes} bytes; the limit is {limit_bytes} bytes "
            f"(--max-text-bytes). Shorten it or split it into several posts."
        )


class RateLimited(PostRejected):
    reason = "rate_limited"

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @classmethod
    def for_author(cls, author: str, limit: int, retry_after_s: float) -> RateLimited:
        return cls(
            f"author {author!r} has made {limit} posts in the last minute, the limit "
            f"(--posts-per-author-per-minute); retry in {retry_after_s:.1f} s.",
            retry_after_s,
        )

    def wire_details(self) -> Mapping[str, str]:
        return {"retry_after_s": f"{self.retry_after_s:.3f}"}

    @classmethod
    def from_wire(cls, message: str, details: Mapping[str, str]) -> MeshError:
        try:
            retry_after_s = float(details.get("retry_after_s", "0"))
        except ValueError:
            retry_after_s = 0.0
        return cls(message, retry_after_s)


class SecretDetected(PostRejected):
    reason = "secret_detected"

    @classmethod
    def for_findings(cls, findings: tuple[str, ...]) -> SecretDetected:
        return cls(
            "post refused: it looks like it contains secrets ("
            + ", ".join(findings)
            + "). Remove them and post again; nothing was stored or sent."
        )


class SubscriberTooSlow(BlackboardError):
    """A Subscribe stream fell too far behind and the node cut it off."""

    reason = "subscriber_too_slow"


class BlackboardUnavailable(BlackboardError):
    """The blackboard service could not be reached or failed."""

    reason = "unavailable"


class EmbeddingUnavailable(BlackboardError):
    """No worker embedded the texts (none serves an embeddings model, or every one failed).
    Posts are embedded later; a search falls back to words and says so."""

    reason = "embedding_unavailable"


class EmbeddingRefused(EmbeddingUnavailable):
    """A worker refused the input itself (e.g. more tokens than the model embeds at once):
    another worker would refuse it too; a shorter text may pass."""

    reason = "embedding_refused"


register_status(PostRejected, grpc.StatusCode.INVALID_ARGUMENT)
register_status(RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED)
register_status(SubscriberTooSlow, grpc.StatusCode.RESOURCE_EXHAUSTED)
register_status(BlackboardUnavailable, grpc.StatusCode.UNAVAILABLE)
