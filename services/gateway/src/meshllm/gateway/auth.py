"""API keys: who may call the gateway, and with what limits (pure functions and data).

The gateway keeps only SHA-256 hashes of keys. A key given in plain (`--api-key`,
MESHLLM_API_KEYS) is hashed when the config loads; a keys file holds hashes only, one
entry per line:

    NAME sha256:HEX [rpm=N] [tpm=N] [concurrent=N] [models=MODEL,MODEL]

`rpm` is requests per minute, `tpm` tokens (prompt + completion) per minute, `concurrent`
requests (streams included) in flight at once, `models` the models the key may use
(absent: all). Blank lines and lines starting with # are skipped.
`mesh-llm keys new NAME` prints a fresh key and its line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshllm.common.errors import ConfigError, MeshError

KEY_PREFIX = "mesh-"      # of generated keys, so that they are recognisable in a leak scan
HASH_PREFIX = "sha256:"
LIMIT_FIELDS = ("rpm", "tpm", "concurrent", "models")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


class AccessDenied(MeshError):
    """The request's credentials do not allow it."""

    reason = "access_denied"


class InvalidApiKey(AccessDenied):
    """No key, or a key the gateway does not know."""

    reason = "invalid_api_key"


class ModelNotAllowed(AccessDenied):
    """The key is known but may not use this model."""

    reason = "model_not_allowed"

    def __init__(self, key_name: str, model: str) -> None:
        super().__init__(f"The API key {key_name!r} may not use the model {model!r}.")
        self.param = "model"


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str                              # hex digest of the key
    requests_per_minute: int = 0             # 0: no limit
    tokens_per_minute: int = 0               # prompt + completion tokens; 0: no limit
    concurrent: int = 0                      # requests in flight at once; 0: no limit
    models: frozenset[str] | None = None     # None: every model

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def file_line(name: str, key: str) -> str:
    """The keys-file entry of `key` (its hash, never the key)."""
    return f"{name} {HASH_PREFIX}{hash_key(key)}"


def plain_key(text: str) -> str:
    """A key given on the command line or in MESHLLM_API_KEYS."""
    if not text or any(c.isspace() or c == "," for c in text):
        raise ValueError("an API key must be non-empty, without spaces or commas")
    return text


def plain_keys(keys: Sequence[str]) -> tuple[ApiKey, ...]:
    return tuple(ApiKey(f"key-{i}", hash_key(key)) for i, key in enumerate(keys, 1))


def _positive(field: str, value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return int(value)


def key_name(text: str) -> str:
    if not text or not set(text) <= _NAME_CHARS:
        raise ValueError(f"bad key name {text!r} (letters, digits, . _ - @)")
    return text


def parse_entry(line: str) -> ApiKey:
    name, _, rest = line.strip().partition(" ")
    key_name(name)
    if not rest.split():
        raise ValueError("missing the key's hash: NAME sha256:HEX [rpm=N] [tpm=N] "
                         "[concurrent=N] [models=A,B]")
    digest, *fields = rest.split()
    if not digest.startswith(HASH_PREFIX) or len(digest) != len(HASH_PREFIX) + 64 or any(
            c not in "0123456789abcdef" for c in digest[len(HASH_PREFIX):]):
        raise ValueError("the second field must be sha256:<64 lowercase hex digits> "
                         "(the key's hash, never the key; see `mesh-llm keys new`)")
    options: dict[str, str] = {}
    for item in fields:
        field, sep, value = item.partition("=")
        if not sep or field not in LIMIT_FIELDS or field in options:
            raise ValueError(f"unknown or repeated field {item!r} "
                             "(rpm=N, tpm=N, concurrent=N, models=A,B)")
        options[field] = value
    models = options.get("models")
    counts = {f: _positive(f, options[f]) if f in options else 0
              for f in ("rpm", "tpm", "concurrent")}
    return ApiKey(name, digest[len(HASH_PREFIX):], counts["rpm"], counts["tpm"],
                  counts["concurrent"],
                  frozenset(m for m in models.split(",") if m) if models is not None
                  else None)


def parse_keys_file(text: str, source: str) -> tuple[ApiKey, ...]:
    """Every entry of a keys file; a bad line raises ConfigError naming the file and line."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.append(parse_entry(line))
        except ValueError as exc:
            raise ConfigError(f"{source} line {number}", str(exc)) from None
    return keys_checked(keys, source)


def keys_checked(keys: Iterable[ApiKey], source: str) -> tuple[ApiKey, ...]:
    """The keys, refusing two of the same name (limits are kept per name)."""
    seen: set[str] = set()
    for key in keys:
        if key.name in seen:
            raise ConfigError(source, f"the key name {key.name!r} is used twice")
        seen.add(key.name)
    return tuple(keys)


class KeyRing:
    """The keys the gateway accepts. An empty ring accepts every request."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys = tuple(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash matches; every hash is compared in constant time, and all of
        them, so that the answer's timing tells nothing about which one nearly matched."""
        digest = hash_key(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    def authenticate(self, authorization: str) -> ApiKey:
        """The key of an `Authorization: Bearer KEY` header; InvalidApiKey if none matches."""
        scheme, _, presented = authorization.partition(" ")
        if not authorization:
            raise InvalidApiKey("You didn't provide an API key. Send it in an "
                                "Authorization header: 'Authorization: Bearer YOUR_KEY'.")
        key = self.find(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise InvalidApiKey("Incorrect API key provided.")
        return key


def exposure_warning(host: str, keys_configured: bool) -> str | None:
    """What to warn about when the gateway takes anyone on a non-loopback address."""
    if keys_configured or _loopback(host):
        return None
    return (f"the gateway listens on {host} without API keys: anyone who can reach this "
            "address may use it (set --api-key, MESHLLM_API_KEYS or --api-keys-file, or "
            "listen on 127.0.0.1)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
