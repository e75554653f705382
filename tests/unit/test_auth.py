"""API keys: hashing, the keys file, the key ring, the per-key limiter (a fake clock), the
exposure warning, `mesh-llm keys`, and the gate in front of a small app."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
from pathlib import Path

import pytest
from meshllm.cli.keys_cmd import entry_line, run_keys
from meshllm.cli.up import access_line, gateway_env, poll_key
from meshllm.cli.up_config import load_up_config
from meshllm.common.errors import ConfigError, MeshError
from meshllm.gateway.auth import (
    ApiKey,
    InvalidApiKey,
    KeyRing,
    exposure_warning,
    file_line,
    hash_key,
    new_key,
    parse_entry,
    parse_keys_file,
    plain_keys,
)
from meshllm.gateway.config import load_config
from meshllm.gateway.gate import COOKIE, Gate, front_door, gate_routes
from meshllm.gateway.key_limits import (
    ConcurrencyExceeded,
    KeyLimiter,
    RequestRateExceeded,
    TokenRateExceeded,
    charge_tokens,
)
from meshllm.gateway.limits import InputLimits
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

SECRET = "mesh-test-secret"
DIGEST = hash_key(SECRET)


# --- hashing and the keys file ---

def test_the_hash_is_sha256_hex_and_the_file_line_holds_no_key() -> None:
    assert hashlib.sha256(SECRET.encode()).hexdigest() == DIGEST
    line = file_line("alice", SECRET)
    assert line == f"alice sha256:{DIGEST}" and SECRET not in line


def test_new_keys_are_long_random_and_recognisable() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("mesh-") and len(a) >= 40


@pytest.mark.parametrize(("line", "expected"), [
    (f"alice sha256:{DIGEST}", ApiKey("alice", DIGEST)),
    (f"  bob sha256:{DIGEST} rpm=60  ", ApiKey("bob", DIGEST, requests_per_minute=60)),
    (f"ci sha256:{DIGEST} tpm=1000 models=a,b rpm=5 concurrent=3",
     ApiKey("ci", DIGEST, 5, 1000, 3, frozenset({"a", "b"}))),
    (f"x@y.z sha256:{DIGEST} models=", ApiKey("x@y.z", DIGEST, models=frozenset())),
])
def test_entries(line: str, expected: ApiKey) -> None:
    assert parse_entry(line) == expected


@pytest.mark.parametrize(("line", "says"), [
    ("alice", "missing the key's hash"),
    (f"alice {SECRET}", "sha256:<64"),
    (f"alice sha256:{DIGEST[:-1]}", "sha256:<64"),
    (f"alice sha256:{DIGEST.upper()}", "lowercase hex"),
    (f"al/ice sha256:{DIGEST}", "bad key name"),
    (f"alice sha256:{DIGEST} rpm=0", "rpm must be a positive integer"),
    (f"alice sha256:{DIGEST} tpm=lots", "tpm must be a positive integer"),
    (f"alice sha256:{DIGEST} burst=3", "unknown or repeated field"),
    (f"alice sha256:{DIGEST} rpm=1 rpm=2", "unknown or repeated field"),
    (f"alice sha256:{DIGEST} concurrent=-1", "concurrent must be a positive integer"),
])
def test_bad_entries_say_why(line: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_entry(line)


def test_the_file_skips_comments_and_blank_lines_and_errors_name_the_line() -> None:
    text = f"# keys\n\nalice sha256:{DIGEST}\n  # indented comment\nbob sha256:nothex\n"
    with pytest.raises(ConfigError) as info:
        parse_keys_file(text, "/etc/keys")
    assert info.value.key == "/etc/keys line 5"
    assert parse_keys_file(text.rsplit("bob", 1)[0], "f") == (ApiKey("alice", DIGEST),)


def test_a_name_used_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="used twice"):
        parse_keys_file(f"a sha256:{DIGEST}\na sha256:{hash_key('other')}\n", "f")


# --- the gateway's config ---

def test_plain_keys_are_hashed_and_joined_with_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"ci sha256:{DIGEST} rpm=2\n")
    config = load_config(["--api-key", "key-one-x", "--api-key", "key-two-x",
                          "--api-keys-file", str(keys_file)], {})
    assert config.api_keys == (ApiKey("key-1", hash_key("key-one-x")),
                               ApiKey("key-2", hash_key("key-two-x")),
                               ApiKey("ci", DIGEST, requests_per_minute=2))
    assert "key-one-x" not in repr(config)  # the config keeps hashes only
    from_env = load_config([], {"MESHLLM_API_KEYS": "key-one-x, key-two-x"})
    assert from_env.api_keys == config.api_keys[:2]
    assert load_config([], {}).api_keys == ()


@pytest.mark.parametrize(("argv", "key"), [
    (["--api-key", "has space"], "--api-key / MESHLLM_API_KEYS"),
    (["--api-keys-file", "/nonexistent/keys"], "--api-keys-file / MESHLLM_API_KEYS_FILE"),
])
def test_bad_key_settings_name_the_option(argv: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, {})
    assert info.value.key == key


# --- the key ring ---

def test_the_ring_finds_the_key_of_a_bearer_header() -> None:
    ring = KeyRing((ApiKey("a", hash_key("ka")), ApiKey("b", DIGEST)))
    assert ring.authenticate(f"Bearer {SECRET}").name == "b"
    assert ring.authenticate(f"bearer  {SECRET} ").name == "b"
    assert ring.find("ka") is not None and ring.find("kb") is None


@pytest.mark.parametrize(("header", "says"), [
    ("", "didn't provide an API key"),
    ("Bearer wrong", "Incorrect API key"),
    (f"Basic {SECRET}", "Incorrect API key"),
    ("Bearer", "Incorrect API key"),
])
def test_the_ring_refuses_missing_and_wrong_keys(header: str, says: str) -> None:
    with pytest.raises(InvalidApiKey, match=says):
        KeyRing(plain_keys([SECRET])).authenticate(header)


def test_the_ring_compares_hashes_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[str, str]] = []

    def compare(a: str, b: str) -> bool:
        compared.append((a, b))
        return a == b
    monkeypatch.setattr(hmac, "compare_digest", compare)
    ring = KeyRing(plain_keys(["k1", SECRET, "k3"]))
    assert ring.find(SECRET) is not None
    # every key's hash is compared (no early exit), and never the key itself
    assert [b for _, b in compared] == [hash_key("k1"), DIGEST, hash_key("k3")]
    assert all(a == DIGEST for a, _ in compared)


# --- the limiter, over a fake clock ---

RPM2 = ApiKey("r", DIGEST, requests_per_minute=2)
TPM100 = ApiKey("t", DIGEST, tokens_per_minute=100)


@pytest.mark.parametrize(("times", "refused_at", "retry_after_s"), [
    ([0.0, 1.0], None, None),                 # two in a minute: both pass
    ([0.0, 1.0, 2.0], 2.0, 58.0),             # the third waits for the first to age out
    ([0.0, 30.0, 59.5], 59.5, 0.5),
    ([0.0, 30.0, 60.0], None, None),          # the first has left the window
    ([0.0, 1.0, 60.5, 60.7], 60.7, 0.3),      # sliding: 1.0 and 60.5 remain
])
def test_requests_per_minute(times: list[float], refused_at: float | None,
                             retry_after_s: float | None) -> None:
    limiter = KeyLimiter()
    for now in times:
        if now == refused_at:
            with pytest.raises(RequestRateExceeded) as info:
                limiter.admit(RPM2, now)
            assert info.value.retry_after_s == pytest.approx(retry_after_s)
        else:
            limiter.admit(RPM2, now)


def test_a_refused_request_is_not_counted_and_keys_are_separate() -> None:
    limiter = KeyLimiter()
    for now in (0.0, 1.0):
        limiter.admit(RPM2, now)
    for now in (2.0, 3.0):
        with pytest.raises(RequestRateExceeded):
            limiter.admit(RPM2, now)
    limiter.admit(RPM2, 60.0)  # only the first aged out; the refusals took no slot
    limiter.admit(ApiKey("other", DIGEST, requests_per_minute=2), 60.0)


@pytest.mark.parametrize(("charges", "at", "refused", "retry_after_s"), [
    ([(0.0, 99)], 1.0, False, None),
    ([(0.0, 100)], 1.0, True, 59.0),
    ([(0.0, 60), (10.0, 60)], 20.0, True, 40.0),   # below the limit once the first expires
    ([(0.0, 60), (10.0, 60)], 60.0, False, None),
    ([(0.0, 90), (10.0, 60)], 30.0, True, 30.0),   # 60 left once the first expires
])
def test_tokens_per_minute(charges: list[tuple[float, int]], at: float, refused: bool,
                           retry_after_s: float | None) -> None:
    limiter = KeyLimiter()
    for now, tokens in charges:
        limiter.admit(TPM100, now)
        limiter.charge(TPM100, tokens, now)
    if refused:
        with pytest.raises(TokenRateExceeded) as info:
            limiter.admit(TPM100, at)
        assert info.value.retry_after_s == pytest.approx(retry_after_s)
    else:
        limiter.admit(TPM100, at)


def test_concurrent_requests_are_counted_until_released() -> None:
    key = ApiKey("c", DIGEST, concurrent=2)
    limiter = KeyLimiter()
    limiter.admit(key, 0.0)
    limiter.admit(key, 0.0)
    with pytest.raises(ConcurrencyExceeded) as info:
        limiter.admit(key, 0.0)
    assert info.value.retry_after_s == 1.0
    limiter.release(key)
    limiter.admit(key, 0.0)
    limiter.release(key)
    limiter.release(key)
    assert not limiter._in_flight


def test_keys_without_limits_are_not_tracked() -> None:
    limiter = KeyLimiter()
    for i in range(1000):
        limiter.admit(ApiKey("free", DIGEST), float(i) / 1000)
        limiter.charge(ApiKey("free", DIGEST), 10**6, 0.0)
    assert not limiter._usage and not limiter._in_flight


# --- the warning when anyone may call ---

@pytest.mark.parametrize(("host", "keys", "warns"), [
    ("0.0.0.0", False, True), ("::", False, True), ("10.1.2.3", False, True),
    ("gateway.example", False, True), ("127.0.0.1", False, False), ("::1", False, False),
    ("localhost", False, False), ("0.0.0.0", True, False),
])
def test_exposure_warning(host: str, keys: bool, warns: bool) -> None:
    assert (exposure_warning(host, keys) is not None) == warns


# --- mesh-llm keys, and up handing keys to its gateway ---

def test_keys_new_prints_the_key_once_and_a_line_that_matches_it() -> None:
    out = io.StringIO()
    run_keys(argparse.Namespace(keys_command="new", name="alice", rpm=30, tpm=0,
                                concurrent=2, models="m1"), stdout=out)
    lines = [line.strip() for line in out.getvalue().splitlines()]
    key, entry = lines[1], parse_entry(lines[3])
    assert out.getvalue().count(key) == 1
    assert entry == ApiKey("alice", hash_key(key), requests_per_minute=30, concurrent=2,
                           models=frozenset({"m1"}))


def test_keys_hash_reads_the_key_from_stdin() -> None:
    out = io.StringIO()
    run_keys(argparse.Namespace(keys_command="hash"), io.StringIO(SECRET + "\n"), out)
    assert out.getvalue().strip() == f"NAME sha256:{DIGEST}"


def test_a_bad_entry_is_refused_before_printing_a_key() -> None:
    with pytest.raises(MeshError, match="bad key name"):
        entry_line("bad name", SECRET)


def test_up_hands_keys_to_the_gateway_in_its_environment(tmp_path: Path) -> None:
    cfg = load_up_config(["--api-key", "k1", "--api-key", "k2"], {})
    assert cfg.api_keys == ("k1", "k2") and poll_key(cfg) == "k1"
    assert gateway_env(cfg, poll_key(cfg)) == {"MESHLLM_API_KEYS": "k1,k2"}
    assert "API key required" in access_line(cfg)
    open_cfg = load_up_config([], {})
    assert poll_key(open_cfg) == ""
    assert gateway_env(open_cfg, "") == {} and "no API key" in access_line(open_cfg)


@pytest.mark.parametrize(("argv", "host"), [
    ([], "127.0.0.1"),                                   # open: loopback only
    (["--api-key", "k1"], "0.0.0.0"),                    # keyed: every address
    (["--host", "0.0.0.0"], "0.0.0.0"),                  # told to listen wider
    (["--api-key", "k1", "--host", "10.0.0.5"], "10.0.0.5"),
])
def test_an_open_up_listens_on_loopback_unless_told(argv: list[str], host: str) -> None:
    up = load_up_config(argv, {})
    assert up.host == host
    local_only = "listening on 127.0.0.1 only" in access_line(up)
    assert local_only == (host == "127.0.0.1")


@pytest.mark.parametrize(("argv", "env", "address"), [
    ([], {}, ("127.0.0.1", 9337)),
    (["--api-key", "k1"], {}, ("0.0.0.0", 9337)),
    ([], {"MESHLLM_API_KEYS": "k1"}, ("0.0.0.0", 9337)),
    (["--listen", "0.0.0.0:9000"], {}, ("0.0.0.0", 9000)),  # told to listen wider
])
def test_an_open_gateway_listens_on_loopback_unless_told(
        argv: list[str], env: dict[str, str], address: tuple[str, int]) -> None:
    cfg = load_config(argv, env)
    assert (cfg.host, cfg.port) == address


def test_with_only_a_keys_file_up_makes_a_key_of_its_own_to_poll_with(tmp_path: Path
                                                                      ) -> None:
    cfg = load_up_config([], {"MESHLLM_API_KEYS_FILE": str(tmp_path / "keys")})
    poll = poll_key(cfg)
    assert poll.startswith("mesh-") and poll != poll_key(cfg)  # fresh each run
    assert gateway_env(cfg, poll) == {"MESHLLM_API_KEYS": poll,
                                      "MESHLLM_API_KEYS_FILE": str(tmp_path / "keys")}
    assert "API key required" in access_line(cfg)


# --- the gate in front of an app ---

def _app(gate: Gate, cors: tuple[str, ...] = ()) -> TestClient:
    async def echo(request: Request) -> Response:
        body = await request.json()
        charge_tokens(int(body.get("tokens", 0)))
        return JSONResponse({"got": body})

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"]),
                            Route("/health", ok), Route("/api/status", ok),
                            Route("/console", ok), *gate_routes()])
    return TestClient(front_door(app, gate, cors))


def _gate(*keys: ApiKey, clock: list[float] | None = None) -> Gate:
    now = clock if clock is not None else [0.0]
    return Gate(KeyRing(keys), InputLimits(), clock=lambda: now[0])


ALICE = ApiKey("alice", DIGEST, requests_per_minute=2, models=frozenset({"m1"}))
AUTH = {"Authorization": f"Bearer {SECRET}"}


def test_without_keys_everything_is_open() -> None:
    client = _app(_gate())
    assert client.post("/v1/chat/completions", json={"model": "any"}).status_code == 200
    assert client.get("/api/status").status_code == 200


def test_keys_guard_every_path_but_health() -> None:
    client = _app(_gate(ALICE))
    assert client.get("/health").status_code == 200
    for path in ("/api/status", "/console"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=AUTH).status_code == 200
    refused = client.post("/v1/chat/completions", json={"model": "m1"})
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "invalid_api_key"


def test_a_model_the_key_may_not_use_is_403() -> None:
    client = _app(_gate(ALICE))
    assert client.post("/v1/chat/completions", json={"model": "m1"}, headers=AUTH
                       ).json() == {"got": {"model": "m1"}}
    refused = client.post("/v1/chat/completions", json={"model": "m2"}, headers=AUTH)
    assert refused.status_code == 403
    assert refused.json()["error"] == {
        "message": "The API key 'alice' may not use the model 'm2'.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_allowed"}


def test_over_the_rate_is_429_with_retry_after() -> None:
    clock = [100.0]
    client = _app(_gate(ALICE, clock=clock))
    for _ in range(2):
        assert client.get("/api/status", headers=AUTH).status_code == 200
    clock[0] = 130.2
    refused = client.get("/api/status", headers=AUTH)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "30"
    assert refused.json()["error"]["type"] == "requests"
    clock[0] = 160.0
    assert client.get("/api/status", headers=AUTH).status_code == 200


def test_tokens_used_by_a_request_count_against_its_key() -> None:
    clock = [0.0]
    client = _app(_gate(ApiKey("t", DIGEST, tokens_per_minute=100), clock=clock))
    body = {"model": "m", "tokens": 120}
    assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    refused = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    clock[0] = 60.0
    assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200


def test_the_console_asks_for_the_key_and_keeps_it_in_a_cookie() -> None:
    client = _app(_gate(ApiKey("alice", DIGEST)))
    page = client.get("/console")
    assert page.status_code == 401 and "API key" in page.text
    assert client.post("/console/login").status_code == 401
    login = client.post("/console/login", headers=AUTH)
    assert login.status_code == 200
    assert "httponly" in login.headers["set-cookie"].lower()
    assert "samesite=strict" in login.headers["set-cookie"].lower()
    assert client.get("/console").status_code == 200          # the cookie, sent back
    assert client.get("/api/status").status_code == 200
    # a cookie never authorizes a POST: another site could make a browser send one
    assert client.post("/v1/chat/completions", json={"model": "m1"}).status_code == 401
    client.cookies.clear()
    client.cookies.set(COOKIE, "wrong")
    assert client.get("/api/status").status_code == 401


@pytest.mark.parametrize(("cookie", "status"), [
    (f"{COOKIE}={SECRET}", 200),
    (f"x y=1; other=\"odd; {COOKIE}={SECRET}", 200),  # other apps' cookies on localhost
    (f'{COOKIE}="{SECRET}"', 200),
    (f"{COOKIE}x={SECRET}", 401),
    ("", 401),
])
def test_the_key_cookie_is_found_among_others(cookie: str, status: int) -> None:
    client = _app(_gate(ApiKey("alice", DIGEST)))
    assert client.get("/api/status", headers={"Cookie": cookie}).status_code == status


def test_cors_is_off_unless_origins_are_configured() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = _app(_gate(ApiKey("alice", DIGEST))).options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    client = _app(_gate(ApiKey("alice", DIGEST)), cors=("https://app.example",))
    opened = client.options("/v1/chat/completions", headers=preflight)
    assert opened.status_code == 200
    assert opened.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/v1/chat/completions",
                           headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_request_in_flight_holds_its_slot_until_it_ends_or_is_refused() -> None:
    gate = _gate(ApiKey("one-at-a-time", DIGEST, concurrent=1))
    client = _app(gate)
    for _ in range(3):  # each ends before the next: the slot comes back
        assert client.post("/v1/chat/completions", json={"model": "m"}, headers=AUTH
                           ).status_code == 200
    nested: list[object] = []
    for _ in range(70):  # deeper than the default limit of 64
        nested = [nested]
    deep = {"model": "m", "x": nested}
    assert client.post("/v1/chat/completions", json=deep, headers=AUTH).status_code == 400
    assert client.get("/api/status", headers=AUTH).status_code == 200
    assert not gate.limiter._in_flight
