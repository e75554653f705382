"""Routing that learns, table-driven: bans with exponential backoff that end in a probe,
load-aware order (this gateway's calls and the workers' own running/queued/slots), and
prefix affinity (a conversation goes back to the replica that holds its prefix)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from meshllm.common.types import ChatMessage, LoadState, ModelId, ModelState, WorkerId, WorkerInfo
from meshllm.gateway.affinity import PrefixTable, chat_keys, longest_match, text_keys
from meshllm.gateway.bans import (
    BAN_MAX_S,
    Health,
    WorkerLoad,
    ban_s,
    health,
    on_dispatch,
    on_failure,
    on_return,
    on_success,
)
from meshllm.gateway.metrics import GatewayMetrics
from meshllm.gateway.routing import (
    AFFINITY_MAX_EXTRA_LOAD,
    Affinity,
    RequestKey,
    RouteStats,
    decide,
    route,
)

M = ModelId("m")
NOW = 100.0


@pytest.mark.parametrize(("strikes", "expected"), [
    (0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, BAN_MAX_S), (500, BAN_MAX_S),
])
def test_ban_doubles_per_failure_up_to_a_cap(strikes: int, expected: float) -> None:
    assert ban_s(strikes) == expected


Step = Callable[[WorkerLoad], WorkerLoad]


def fail(at: float) -> Step:
    return lambda s: on_failure(s, at)


def ok(at: float) -> Step:
    return lambda s: on_success(s, at)


def probe_sent(at: float) -> Step:
    return lambda s: on_dispatch(s, at)[0]


@pytest.mark.parametrize(("steps", "at", "expected"), [
    ([], NOW, Health.HEALTHY),
    ([fail(99.5)], NOW, Health.BANNED),                     # banned 1 s: until 100.5
    ([fail(98.0)], NOW, Health.PROBE),                      # ban over: next call probes
    ([fail(98.0), probe_sent(NOW)], NOW, Health.BANNED),    # one probe at a time
    ([fail(98.0), probe_sent(NOW), ok(NOW)], NOW, Health.HEALTHY),
    ([fail(97.0), fail(98.5)], NOW, Health.BANNED),         # second strike: 2 s, to 100.5
    ([fail(97.0), fail(98.5)], 100.6, Health.PROBE),
    ([fail(90.0), fail(91.0), ok(92.0), fail(99.5)], 100.6, Health.PROBE),  # reset: 1 s
    ([fail(90.0), fail(91.0), fail(99.5)], 100.6, Health.BANNED),           # 4 s ban
], ids=["never failed", "banned", "ban over", "probe running", "probe answered",
        "backoff doubles", "longer ban over", "success resets backoff", "third strike"])
def test_ban_state_machine(steps: list[Step], at: float, expected: Health) -> None:
    state = WorkerLoad()
    for step in steps:
        state = step(state)
    assert health(state, at) is expected


def test_a_probe_that_ends_without_a_verdict_lets_the_next_call_probe() -> None:
    banned = on_failure(WorkerLoad(), 90.0)
    probing, is_probe = on_dispatch(banned, NOW)
    assert is_probe and probing.in_flight == 1
    second, second_is_probe = on_dispatch(probing, NOW)
    assert not second_is_probe  # tried only as a last resort, and never as a probe
    assert health(on_return(second, False), NOW) is Health.BANNED  # the probe still runs
    released = on_return(on_return(second, False), True)
    assert released.in_flight == 0 and health(released, NOW) is Health.PROBE


def test_a_failed_probe_bans_twice_as_long() -> None:
    state, _ = on_dispatch(on_failure(WorkerLoad(), 90.0), NOW)
    state = on_return(on_failure(state, NOW), True)
    assert state.strikes == 2 and state.banned_until_s == NOW + 2.0
    assert health(state, NOW + 1.9) is Health.BANNED and health(state, NOW + 2.0) is Health.PROBE


def worker(name: str, running: int = 0, queued: int = 0, slots: int = 0) -> WorkerInfo:
    return WorkerInfo(WorkerId(name), "127.0.0.1:1", "cpu", 1, 1, 0.0,
                      (ModelState(M, LoadState.READY, running=running, queued=queued,
                                  slots=slots),))


BANNED = on_failure(WorkerLoad(), NOW - 0.5)
EXPIRED = on_failure(WorkerLoad(), NOW - 5.0)
PROBING = on_dispatch(EXPIRED, NOW)[0]


@pytest.mark.parametrize(("replicas", "loads", "expected"), [
    ([worker("c"), worker("a"), worker("b")], {}, "abc"),
    ([worker("c"), worker("a"), worker("b")], {"a": WorkerLoad(2), "b": WorkerLoad(1)}, "cba"),
    ([worker("c"), worker("a"), worker("b")], {"a": BANNED}, "bca"),
    ([worker("c"), worker("a"), worker("b")], {"a": EXPIRED}, "abc"),
    ([worker("c"), worker("a"), worker("b")], {"a": PROBING}, "bca"),
    ([worker("c"), worker("a"), worker("b")],
     {"a": WorkerLoad(5), "b": BANNED, "c": WorkerLoad(5)}, "acb"),
    ([worker("a", running=3), worker("b", running=1)], {}, "ba"),
    ([worker("a", running=1, queued=2), worker("b", running=2)], {}, "ba"),
    ([worker("a", running=1), worker("b")], {"b": WorkerLoad(2)}, "ab"),
    ([worker("a", running=2), worker("b", running=3)], {"a": WorkerLoad(2)}, "ab"),
    ([worker("a", running=2, slots=2), worker("b", running=3, slots=8)], {}, "ba"),
    ([worker("a", running=1, slots=4), worker("b", running=1, slots=2)], {}, "ab"),
], ids=["ties by id", "least busy first", "banned last", "ban over: back in line",
        "probe running: last", "failure outweighs load", "reported running",
        "running plus queued", "own calls in flight", "own calls not counted twice",
        "a free slot first", "equal load: by id"])
def test_route_order(replicas: list[WorkerInfo], loads: dict[str, WorkerLoad],
                     expected: str) -> None:
    stats = RouteStats({WorkerId(k): v for k, v in loads.items()})
    order = route(RequestKey(M), replicas, stats, NOW)
    assert "".join(w.worker_id for w in order) == expected


KEYS = (11, 12, 13)


@pytest.mark.parametrize(("replicas", "loads", "prefixes", "order", "affinity"), [
    ([worker("a"), worker("b")], {}, {12: "b"}, "ba", Affinity.HIT),
    ([worker("a"), worker("b")], {}, {11: "a", 12: "b"}, "ba", Affinity.HIT),
    ([worker("a"), worker("b")], {}, {99: "b"}, "ab", Affinity.MISS),
    ([worker("a"), worker("b")], {}, {12: "gone"}, "ab", Affinity.MISS),
    ([worker("a"), worker("b", running=AFFINITY_MAX_EXTRA_LOAD)], {}, {12: "b"}, "ba",
     Affinity.HIT),
    ([worker("a"), worker("b", running=AFFINITY_MAX_EXTRA_LOAD + 1)], {}, {12: "b"}, "ab",
     Affinity.BUSY),
    ([worker("a", running=4), worker("b", running=6)], {}, {12: "b"}, "ba", Affinity.HIT),
    ([worker("a"), worker("b")], {"b": BANNED}, {12: "b"}, "ab", Affinity.BUSY),
    ([worker("a"), worker("b")], {"a": BANNED}, {12: "b"}, "ba", Affinity.HIT),
    ([worker("a", running=5), worker("b")], {"b": BANNED}, {12: "a"}, "ab", Affinity.HIT),
    ([worker("a"), worker("b")], {"b": EXPIRED}, {12: "b"}, "ba", Affinity.HIT),
], ids=["back to its replica", "longest prefix wins", "unknown prefix", "replica gone",
        "busier within the margin", "much busier: least busy", "margin over the least busy",
        "banned replica", "others banned", "banned ones set no margin", "probe goes home"])
def test_prefix_affinity(replicas: list[WorkerInfo], loads: dict[str, WorkerLoad],
                         prefixes: dict[int, str], order: str, affinity: Affinity) -> None:
    stats = RouteStats({WorkerId(k): v for k, v in loads.items()},
                       {k: WorkerId(v) for k, v in prefixes.items()})
    decision = decide(RequestKey(M, KEYS), replicas, stats, NOW)
    assert "".join(w.worker_id for w in decision.order) == order
    assert decision.affinity is affinity


def test_no_prefix_keys_is_no_affinity_question() -> None:
    decision = decide(RequestKey(M), [worker("a")], RouteStats(prefixes={1: WorkerId("a")}), NOW)
    assert decision.affinity is Affinity.NONE and decision.matched == 0


def turns(n: int) -> list[ChatMessage]:
    chat = [ChatMessage("system", "You are terse.")]
    for i in range(n):
        chat += [ChatMessage("user", f"question {i}"), ChatMessage("assistant", f"answer {i}")]
    return chat


def test_a_conversation_that_goes_on_shares_the_keys_of_its_past() -> None:
    first = chat_keys(M, turns(1)[:-1])  # system + first question
    later = chat_keys(M, [*turns(3), ChatMessage("user", "question 3")])
    assert later[:len(first)] == first and len(later) == 8
    assert longest_match(later, {k: WorkerId("w") for k in first}) == ("w", len(first))


@pytest.mark.parametrize(("other", "shared"), [
    (lambda: chat_keys(ModelId("other"), turns(1)), 0),
    (lambda: chat_keys(M, turns(1), tools_json='[{"name": "f"}]'), 0),
    (lambda: chat_keys(M, [ChatMessage("system", "You are verbose."), *turns(1)[1:]]), 0),
    (lambda: chat_keys(M, [*turns(1)[:2], ChatMessage("assistant", "another")]), 2),
], ids=["another model", "other tools", "another system prompt", "another answer"])
def test_keys_differ_from_where_prompts_differ(other: Callable[[], tuple[int, ...]],
                                               shared: int) -> None:
    mine, theirs = chat_keys(M, turns(1)), other()
    assert [a == b for a, b in zip(mine, theirs, strict=True)] == (
        [True] * shared + [False] * (len(mine) - shared))


@pytest.mark.parametrize(("text", "blocks"), [
    ("", 0), ("x" * 127, 0), ("x" * 128, 1), ("x" * 300, 2),
])
def test_text_keys_cover_whole_blocks(text: str, blocks: int) -> None:
    assert len(text_keys(M, text)) == blocks


def test_text_prompts_that_grow_share_their_leading_blocks() -> None:
    base = "".join(f"line {i}: the quick brown fox.\n" for i in range(20))
    short, long = text_keys(M, base), text_keys(M, base + "and more, and more " * 20)
    assert long[:len(short)] == short and len(long) > len(short)


def test_prefix_table_is_a_bounded_lru_that_reading_does_not_refresh() -> None:
    table = PrefixTable(capacity=3)
    table.remember((1, 2), WorkerId("a"))
    table.remember((3,), WorkerId("b"))
    assert table.get(1) == "a"   # read by routing: no refresh
    table.remember((2, 4), WorkerId("c"))  # 2 refreshed (now c's), 1 the oldest: dropped
    assert dict(table) == {3: "b", 2: "c", 4: "c"}
    assert longest_match((1, 2, 9), table) == ("c", 2)


ROUTING_METRICS = ("meshllm_gateway_worker_bans", "meshllm_gateway_worker_probes",
                   "meshllm_gateway_prefix_affinity")


def counters(metrics: GatewayMetrics) -> dict[str, float]:
    found = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if family.name in ROUTING_METRICS and sample.name.endswith("_total"):
                labels = ",".join(sample.labels.values())
                found[f"{sample.name}[{labels}]"] = sample.value
    return found


def test_routing_metrics_count_bans_probes_and_affinity() -> None:
    metrics = GatewayMetrics()
    metrics.routing.banned("w1")
    metrics.routing.banned("w1")
    metrics.routing.probed("w1")
    for result in ("hit", "hit", "miss", "busy", "none"):
        metrics.routing.routed("m", result)
    assert counters(metrics) == {
        "meshllm_gateway_worker_bans_total[w1]": 2.0,
        "meshllm_gateway_worker_probes_total[w1]": 1.0,
        "meshllm_gateway_prefix_affinity_total[m,hit]": 2.0,
        "meshllm_gateway_prefix_affinity_total[m,miss]": 1.0,
        "meshllm_gateway_prefix_affinity_total[m,busy]": 1.0,
    }
