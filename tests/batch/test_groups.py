"""Groups of slots in flight (batch/groups.py): how many a load gets, which group a request
joins, and the engine running them, stepped in turn and on threads of their own, on the
scripted model. Their outputs are those of one group; no group starves."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from meshllm.common.errors import ConfigError
from meshllm.common.types import SamplingParams
from meshllm.worker.engine.batch import BatchConfig, BatchEngine, Event, Failed, Finished
from meshllm.worker.engine.batch.config import SpecMode
from meshllm.worker.engine.batch.draft import ModelDrafter, NgramDrafter
from meshllm.worker.engine.batch.groups import (
    assign,
    choose_group,
    group_sizes,
    groups_for_link,
    reusable,
)

from .collect import Collector, drain
from .scripted import ChargedBackend, ScriptedBackend, solo_greedy

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [8, 8],
           [5, 3, 5], [6, 1, 6, 1]]


@pytest.mark.parametrize(("slots", "rtt_s", "stages", "want"), [
    (8, 0.0, 0, 1),       # a whole model
    (8, 0.0003, 2, 1),    # loopback
    (8, 0.004, 2, 1),     # a LAN
    (8, 0.040, 2, 4),     # 3 stages at +20 ms a hop: one per process and one more
    (8, 0.020, 1, 3),     # 2 stages
    (8, 0.200, 5, 4),     # at least 2 slots a group
    (4, 0.040, 2, 2),
    (1, 0.040, 2, 1),
    (3, 0.040, 2, 1),
])
def test_groups_for_link(slots: int, rtt_s: float, stages: int, want: int) -> None:
    assert groups_for_link(slots, rtt_s, stages) == want


@pytest.mark.parametrize(("slots", "groups", "want"), [
    (8, 1, (8,)), (8, 4, (2, 2, 2, 2)), (8, 3, (3, 3, 2)), (5, 2, (3, 2)), (2, 2, (1, 1)),
])
def test_group_sizes(slots: int, groups: int, want: tuple[int, ...]) -> None:
    assert group_sizes(slots, groups) == want


@pytest.mark.parametrize(("room", "loads", "reuse", "want"), [
    ([2, 2], [0, 0], [0, 0], 0),          # a tie: the lowest index
    ([1, 2], [1, 0], [0, 0], 1),          # the least loaded
    ([1, 2], [1, 0], [30, 0], 0),         # a cached prefix outweighs balance
    ([0, 2], [2, 0], [30, 0], 1),         # ... where there is room
    ([1, 1, 1], [1, 1, 1], [0, 9, 12], 2),  # the longest prefix
    ([0, 0], [2, 2], [0, 0], None),       # all full
])
def test_choose_group(room: list[int], loads: list[int], reuse: list[int],
                      want: int | None) -> None:
    assert choose_group(room, loads, reuse) == want


def test_a_burst_spreads_over_the_groups_in_one_assignment() -> None:
    assert assign([2, 2, 2], [0, 0, 0], [[0, 0, 0]] * 7) == [0, 1, 2, 0, 1, 2, None]
    # a follow-up of a cached conversation goes to its group; the rest balance around it
    assert assign([2, 2], [0, 0], [[0, 0], [0, 40], [0, 0]]) == [0, 1, 0]


def test_reusable_counts_only_a_large_share_of_the_prompt() -> None:
    prompt = [1, 2, 3, 4, 5, 6]
    assert reusable([[1, 2, 3, 4, 9]], prompt) == 4
    assert reusable([[1, 2, 9], [1, 2, 3, 4, 5, 6, 7]], prompt) == 5  # the last is recomputed
    assert reusable([[1, 2, 9]], prompt) == 0  # under half of it
    assert reusable([], prompt) == 0


def grouped(groups: int, n_slots: int = 8, **kw: object) -> tuple[BatchEngine, ScriptedBackend]:
    backend = ScriptedBackend()
    config = BatchConfig(model_path="scripted", n_ctx=n_slots * 128, n_slots=n_slots,
                         groups=groups, **kw)  # type: ignore[arg-type]
    return BatchEngine(config, backend), backend


@pytest.mark.parametrize("spec", [SpecMode.NONE, SpecMode.NGRAM])
def test_groups_give_the_tokens_of_one_group_and_all_of_them_work(spec: SpecMode) -> None:
    outs = []
    for groups in (1, 4):
        eng, backend = grouped(groups, spec_mode=spec)
        c = Collector()
        for i, p in enumerate(PROMPTS):
            eng.submit(f"r{i}", p, GREEDY, c)
        drain(eng)
        outs.append(c.ids)
        contexts = [backend, *backend.siblings]
        assert len(contexts) == groups
        # 8 requests at once: two a group, each in a context of its own
        assert all(len([s for s, kv in b.kv.items() if kv]) == 8 // groups for b in contexts)
        assert eng.stats().generated_tokens == 8 * 24
    assert outs[0] == outs[1]
    assert outs[0] == {f"r{i}": solo_greedy(p, 24) for i, p in enumerate(PROMPTS)}


def test_a_conversation_goes_on_in_the_group_that_holds_it() -> None:
    eng, _ = grouped(2, n_slots=4)
    c = Collector()
    first = [3, 1, 4, 1, 5, 9, 2, 6]
    eng.submit("other", [7, 7, 7], GREEDY, c)  # group 0
    eng.submit("t1", first, GREEDY, c)         # group 1, the less loaded
    drain(eng)
    follow = [*first, *solo_greedy(first, 24)[:-1], 2, 2]
    for name in ("busy0", "busy1"):  # one in each group
        eng.submit(name, [5], SamplingParams(max_tokens=60, temperature=0.0), c)
    eng.step()
    eng.submit("t2", follow, GREEDY, c)  # a tie, which goes to group 1: it holds the prefix
    drain(eng)
    assert c.finished["t2"].cached_prompt_tokens == len(first) + 23
    assert c.ids["t2"] == solo_greedy(follow, 24)


def test_cancel_reaches_the_group_that_runs_the_request() -> None:
    eng, _ = grouped(4)
    c = Collector()
    for i in range(6):
        eng.submit(f"r{i}", [i + 1], SamplingParams(max_tokens=100, temperature=0.0), c)
    eng.step()
    assert eng.cancel("r5") and eng.cancel("r2")
    drain(eng)
    assert c.finished["r5"].reason == c.finished["r2"].reason == "cancelled"
    assert c.finished["r5"].completion_tokens < 100
    assert all(c.finished[f"r{i}"].completion_tokens == 100 for i in (0, 1, 3, 4))


def test_a_full_group_leaves_queued_requests_to_the_others_and_none_starves() -> None:
    eng, backend = grouped(2, n_slots=4, max_queue=16)
    c = Collector()
    for i in range(12):  # three waves of four
        eng.submit(f"r{i}", PROMPTS[i % 8], SamplingParams(max_tokens=8 + i, temperature=0.0),
                   c)
    drain(eng)
    assert len(c.finished) == 12 and not c.failed
    assert all(c.ids[f"r{i}"] == solo_greedy(PROMPTS[i % 8], 8 + i) for i in range(12))
    assert backend.decoded > 0 and backend.siblings[0].decoded > 0


class Overlap:
    """Decodes in flight at once, across the contexts that share it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0


class WaitingBackend(ScriptedBackend):
    """The scripted model with a decode that waits as a device or a stage would (the GIL
    released, as llama_decode releases it); counts how many decodes overlap."""

    def __init__(self, overlap: Overlap, wait_s: float = 0.004) -> None:
        super().__init__()
        self.overlap, self.wait_s = overlap, wait_s

    def sibling(self, context: object) -> ScriptedBackend:
        other = WaitingBackend(self.overlap, self.wait_s)
        self.siblings.append(other)
        return other

    def decode(self, *args: Any) -> Any:
        with self.overlap.lock:
            self.overlap.now += 1
            self.overlap.most = max(self.overlap.most, self.overlap.now)
        time.sleep(self.wait_s)
        with self.overlap.lock:
            self.overlap.now -= 1
        return super().decode(*args)


def test_groups_on_their_own_threads_overlap_their_steps() -> None:
    overlap = Overlap()
    backend = WaitingBackend(overlap)
    eng = BatchEngine(BatchConfig(model_path="scripted", n_ctx=8 * 128, n_slots=8, groups=4,
                                  spec_mode=SpecMode.NGRAM), backend)
    done = threading.Event()
    c = Collector()
    lock = threading.Lock()
    finished: list[Event] = []

    def sink(event: Event) -> None:
        with lock:
            c(event)
            if isinstance(event, Finished | Failed):
                finished.append(event)
                if len(finished) == 16:
                    done.set()

    eng.start()
    try:
        for wave in range(2):
            for i, p in enumerate(PROMPTS):
                eng.submit(f"w{wave}-{i}", p, GREEDY, sink)
        assert done.wait(60)
    finally:
        eng.stop()
    assert not c.failed
    assert all(c.ids[f"w{w}-{i}"] == solo_greedy(p, 24) for w in range(2)
               for i, p in enumerate(PROMPTS))
    assert all(b.decoded > 0 for b in (backend, *backend.siblings))
    assert overlap.most > 1  # one group's wait is another's step
    stats = eng.stats()
    assert stats.running == stats.queued == 0 and stats.generated_tokens == 16 * 24


def test_stopping_fails_what_every_group_holds() -> None:
    eng, _ = grouped(2, n_slots=2)
    events: list[Event] = []
    eng.submit("a", [1], SamplingParams(max_tokens=10_000, temperature=0.0), events.append)
    eng.submit("b", [2], SamplingParams(max_tokens=10_000, temperature=0.0), events.append)
    eng.submit("c", [3], GREEDY, events.append)  # queued
    eng.step()
    eng.stop()
    eng._shutdown()  # what run_forever does after stop()
    failed = {e.request_id for e in events if isinstance(e, Failed)}
    assert failed == {"a", "b", "c"}


def test_groups_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="groups"):
        BatchConfig(model_path="m", n_slots=4, groups=5)
    with pytest.raises(ConfigError, match="groups"):
        BatchConfig(model_path="m", n_slots=4, groups=2, spec_mode=SpecMode.DRAFT,
                    draft_model_path="d")
    config = BatchConfig(model_path="m", n_ctx=512, n_slots=4, groups=2)
    with pytest.raises(ConfigError, match="drafter with state"):
        BatchEngine(config, ScriptedBackend(), ModelDrafter(ScriptedBackend(), 4, 64))

    class OneContext(ScriptedBackend):
        sibling = None  # type: ignore[assignment]

    with pytest.raises(ConfigError, match="second context"):
        BatchEngine(config, OneContext())


def test_a_group_tunes_its_drafts_apart_while_the_others_are_busy() -> None:
    """Step times while other groups hold requests include their queued work: fitted into
    a quiet step's costs they would make one stream's drafts short."""
    backend = ChargedBackend(rtt_s=0.04)
    eng = BatchEngine(BatchConfig(model_path="scripted", n_ctx=512, n_slots=2, groups=2,
                                  spec_mode=SpecMode.NGRAM, link_rtt_s=0.04),
                      backend, NgramDrafter(3, 1), clock=backend.clock)
    quiet, busy = eng._groups[0].runner.tuners  # what the test is about: not public
    long = SamplingParams(max_tokens=40, temperature=0.0)
    eng.submit("a", [1, 2, 3, 1, 2, 3], long, Collector())  # group 0
    eng.submit("b", [4, 5], long, Collector())              # group 1: busy
    for _ in range(10):
        eng.step()
    assert busy.step_s > 0 and quiet.step_s == 0
    drain(eng)
    learnt = busy.step_s
    eng.submit("c", [3, 2, 1, 3, 2, 1], long, Collector())  # alone
    drain(eng)
    assert quiet.step_s > 0 and busy.step_s == learnt
