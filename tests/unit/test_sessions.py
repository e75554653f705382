"""Sticky sessions, table-driven: a named session (X-Session-Id, else `user`) goes to one
replica by rendezvous hash, whatever the load or the prompt; when that replica fails or
goes, only its sessions move, each to the same next replica from every gateway."""

from __future__ import annotations

import pytest
from meshllm.common.types import LoadState, ModelId, ModelState, WorkerId, WorkerInfo
from meshllm.gateway.affinity import PrefixTable, text_keys
from meshllm.gateway.bans import WorkerLoad
from meshllm.gateway.errors import ApiError
from meshllm.gateway.openai_api import parse_chat, parse_completion
from meshllm.gateway.responses_api import parse_responses
from meshllm.gateway.routing import Affinity, RequestKey, RouteStats, decide
from meshllm.gateway.sessions import (
    RouteKeys,
    rendezvous,
    route_keys,
    session_key,
    session_of,
)

M = ModelId("m")
NOW = 100.0
SESSIONS = [f"user-{i}" for i in range(200)]


def worker(name: str, running: int = 0) -> WorkerInfo:
    state = ModelState(M, LoadState.READY, running=running, slots=4)
    return WorkerInfo(WorkerId(name), f"{name}:1", "cpu", 1, 1, 0.0, (state,))


SHARDS = [worker("s1"), worker("s2"), worker("s3")]


def chosen(session: str, replicas: list[WorkerInfo], stats: RouteStats | None = None
           ) -> str:
    key = RequestKey(M, session=session_key(M, session))
    decision = decide(key, replicas, stats or RouteStats(), NOW)
    assert decision.affinity is Affinity.SESSION
    return decision.order[0].worker_id


def test_a_session_sticks_whatever_the_order_of_the_replicas() -> None:
    for session in SESSIONS[:20]:
        first = chosen(session, SHARDS)
        assert chosen(session, list(reversed(SHARDS))) == first


def test_sessions_spread_over_the_replicas() -> None:
    counts = {w.worker_id: 0 for w in SHARDS}
    for session in SESSIONS:
        counts[WorkerId(chosen(session, SHARDS))] += 1
    assert min(counts.values()) > len(SESSIONS) // 6  # about a third each


def test_a_replica_gone_moves_only_its_sessions() -> None:
    before = {s: chosen(s, SHARDS) for s in SESSIONS}
    after = {s: chosen(s, SHARDS[1:]) for s in SESSIONS}
    for session in SESSIONS:
        if before[session] != "s1":
            assert after[session] == before[session]
        else:  # to its second choice, as every gateway computes it
            assert after[session] == rendezvous(session_key(M, session), SHARDS)[1].worker_id


def test_a_banned_replica_sends_its_sessions_to_their_next_choice() -> None:
    session = next(s for s in SESSIONS if chosen(s, SHARDS) == "s2")
    banned = RouteStats({WorkerId("s2"): WorkerLoad(strikes=1, banned_until_s=NOW + 10)})
    order = decide(RequestKey(M, session=session_key(M, session)), SHARDS, banned, NOW).order
    others = [w.worker_id for w in rendezvous(session_key(M, session), SHARDS)
              if w.worker_id != "s2"]
    assert [w.worker_id for w in order] == [*others, "s2"]


def test_load_and_prefix_do_not_move_a_session() -> None:
    session = next(s for s in SESSIONS if chosen(s, SHARDS) == "s3")
    busy = [worker("s1"), worker("s2"), worker("s3", running=4)]
    table = PrefixTable()
    keys = text_keys(M, "x" * 300)
    table.remember(keys, WorkerId("s1"))
    stats = RouteStats(prefixes=table)
    decision = decide(RequestKey(M, keys, session_key(M, session)), busy, stats, NOW)
    assert decision.order[0].worker_id == "s3"


def test_without_a_session_prefix_affinity_still_decides() -> None:
    table = PrefixTable()
    keys = route_keys(M, "x" * 300, None, "", "")
    table.remember(keys, WorkerId("s2"))
    decision = decide(RequestKey(M, keys), SHARDS, RouteStats(prefixes=table), NOW)
    assert (decision.affinity, decision.order[0].worker_id) == (Affinity.HIT, "s2")


def test_route_keys_are_the_prefix_keys_carrying_the_session() -> None:
    keys = route_keys(M, "y" * 300, None, "", "alice")
    assert keys == text_keys(M, "y" * 300) and isinstance(keys, tuple)
    assert session_of(keys) == session_key(M, "alice") != 0
    assert RequestKey(M, keys).session_key == session_of(keys)
    assert session_of(route_keys(M, "y", None, "", "")) == 0
    assert session_of((1, 2)) == 0
    assert RouteKeys((1, 2), 5).session == 5


def test_session_keys_differ_by_model_and_session() -> None:
    assert session_key(M, "a") == session_key(M, "a")
    assert session_key(M, "a") != session_key(M, "b")
    assert session_key(M, "a") != session_key(ModelId("other"), "a")
    assert session_key(M, "") == 0


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("body", "header", "expected"), [
    (BODY, "", ""),
    ({**BODY, "user": "alice"}, "", "alice"),
    ({**BODY, "user": "alice"}, "conv-7", "conv-7"),
    (BODY, "  conv-8 ", "conv-8"),
])
def test_the_session_is_the_header_else_the_user(body: dict[str, object], header: str,
                                                 expected: str) -> None:
    assert parse_chat(body, header).session == expected
    completion = {"model": "m", "prompt": "hi", **{k: v for k, v in body.items()
                                                   if k == "user"}}
    assert parse_completion(completion, header).session == expected


def test_a_user_that_is_no_string_is_refused() -> None:
    with pytest.raises(ApiError) as info:
        parse_chat({**BODY, "user": 7})
    assert info.value.param == "user"


def test_the_responses_api_names_sessions_too() -> None:
    body = {"model": "m", "input": "hi", "user": "alice"}
    assert parse_responses(body).chat.session == "alice"
    assert parse_responses(body, "conv-9").chat.session == "conv-9"
