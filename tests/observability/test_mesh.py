"""Traces, metrics and the console against a real local mesh (etcd, planner, two workers
running llama.cpp, gateway). Spans reach an in-test OTLP collector over loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from meshllm.common.meshview import read_mesh
from meshllm.common.status import MeshStatus, ModelStatus, NodeStatus, ServingState
from meshllm.common.store import SUSPECTS, EtcdStore
from meshllm.common.suspects import SuspectReport, suspect_to_pb
from meshllm.common.types import WorkerId
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.cdp import Browser, Page
from tests.observability.collector import CollectedSpan, Collector
from tests.observability.conftest import ObservedMesh
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration
MODEL = "gemma3-270m"
GATEWAY, WORKER = "mesh-llm-gateway", "mesh-llm-worker"
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def chat(base_url: str, stream: bool = False, max_tokens: int = 8) -> bytes:
    body = json.dumps({"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                       "stream": stream,
                       "messages": [{"role": "user", "content": "Name a colour."}]}).encode()
    request = urllib.request.Request(base_url + "/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return bytes(response.read())


def scrape(url: str) -> Series:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(series: Series, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


def worker_series(mesh: ObservedMesh) -> Series:
    merged: Series = {}
    for name, port in mesh.metrics_ports.items():
        if name.startswith("worker"):
            for (metric, labels), value in scrape(f"http://127.0.0.1:{port}/metrics").items():
                key = (metric, labels | {("worker", name)})
                merged[key] = value
    return merged


def trace_of_request(collector: Collector, since_ns: int) -> list[CollectedSpan]:
    """The spans of the trace whose gateway GenAI span started after `since_ns`, once the
    engine's spans have arrived too."""
    found: list[CollectedSpan] = []

    def complete() -> bool:
        spans = collector.snapshot()
        roots = [s for s in spans if s.service == GATEWAY and s.kind == "CLIENT"
                 and s.name == f"chat {MODEL}" and s.start_ns >= since_ns]
        if not roots:
            return False
        found[:] = [s for s in spans if s.trace_id == roots[0].trace_id]
        return any(s.name == "engine.decode" for s in found)

    wait_until(complete, 20, "the request's spans at the collector")
    return found


def one(spans: list[CollectedSpan], name: str, service: str, kind: str | None = None
        ) -> CollectedSpan:
    matches = [s for s in spans if s.name == name and s.service == service
               and (kind is None or s.kind == kind)]
    assert len(matches) == 1, (name, service, [(s.name, s.service, s.kind) for s in spans])
    return matches[0]


def assert_genai(attrs: Mapping[str, Any]) -> None:
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.request.max_tokens"] == 8
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert 0 < attrs["gen_ai.usage.output_tokens"] <= 8
    assert attrs["gen_ai.response.finish_reasons"][0] in ("stop", "length")


def test_one_trace_covers_gateway_worker_and_engine(observed_mesh: ObservedMesh,
                                                    collector: Collector) -> None:
    since = time.time_ns()
    chat(observed_mesh.base_url, stream=True)
    spans = trace_of_request(collector, since)
    assert len({s.trace_id for s in spans}) == 1
    assert [s.name for s in spans if not s.parent_id] == ["POST /v1/chat/completions"]
    http = one(spans, "POST /v1/chat/completions", GATEWAY, "SERVER")
    gateway = one(spans, f"chat {MODEL}", GATEWAY, "CLIENT")
    route = one(spans, f"route {MODEL}", GATEWAY)
    rpc_out = one(spans, "/meshllm.v1.ShardWorker/Generate", GATEWAY, "CLIENT")
    rpc_in = one(spans, "/meshllm.v1.ShardWorker/Generate", WORKER, "SERVER")
    worker = one(spans, f"chat {MODEL}", WORKER, "INTERNAL")
    phases = [one(spans, f"engine.{p}", WORKER) for p in ("queue", "prompt", "decode")]
    # Each hop is the child of the one before: HTTP, GenAI call, gRPC out, gRPC in, engine.
    assert gateway.parent_id == http.span_id
    assert route.parent_id == gateway.span_id and rpc_out.parent_id == gateway.span_id
    assert rpc_in.parent_id == rpc_out.span_id and worker.parent_id == rpc_in.span_id
    assert all(p.parent_id == worker.span_id for p in phases)
    assert phases[0].end_ns <= phases[1].start_ns <= phases[1].end_ns <= phases[2].start_ns
    assert route.attributes["meshllm.route.chosen"] == worker.attributes["meshllm.worker_id"]
    assert_genai(gateway.attributes)
    assert_genai(worker.attributes)
    assert gateway.attributes["meshllm.outcome"] == "ok"
    assert phases[2].attributes["gen_ai.usage.output_tokens"] > 0


def test_metrics_move_when_requests_run(observed_mesh: ObservedMesh) -> None:
    gateway_url = observed_mesh.base_url + "/metrics"
    g0, w0 = scrape(gateway_url), worker_series(observed_mesh)
    chat(observed_mesh.base_url, stream=True)
    chat(observed_mesh.base_url)
    g1, w1 = scrape(gateway_url), worker_series(observed_mesh)

    def grew(before: Series, after: Series, name: str, by: float = 1, **labels: str) -> None:
        assert total(after, name, **labels) >= total(before, name, **labels) + by, name

    grew(g0, g1, "meshllm_gateway_requests_total", 2, model=MODEL, outcome="ok")
    grew(g0, g1, "meshllm_gateway_time_to_first_token_seconds_count", 2, model=MODEL)
    grew(g0, g1, "meshllm_gateway_inter_token_latency_seconds_count", model=MODEL)
    grew(g0, g1, "meshllm_gateway_prompt_tokens_total", 10, model=MODEL)
    grew(g0, g1, "meshllm_gateway_completion_tokens_total", 2, model=MODEL)
    grew(w0, w1, "meshllm_worker_requests_total", 2, model=MODEL, outcome="ok")
    grew(w0, w1, "meshllm_worker_time_to_first_token_seconds_count", 2, model=MODEL)
    grew(w0, w1, "meshllm_worker_inter_token_latency_seconds_count", model=MODEL)
    grew(w0, w1, "meshllm_worker_prompt_tokens_total", 10, model=MODEL)
    grew(w0, w1, "meshllm_worker_generated_tokens_total", 2, model=MODEL)
    assert total(w1, "meshllm_worker_kv_cache_tokens", model=MODEL) > 0
    assert total(w1, "meshllm_worker_kv_cache_usage_ratio", model=MODEL) > 0
    for name in ("worker-1", "worker-2"):  # per worker: load time, state, load, lease
        assert total(w1, "meshllm_worker_model_load_seconds_count", worker=name) == 1
        assert total(w1, "meshllm_worker_model_state", worker=name, state="ready") == 1
        assert total(w1, "meshllm_worker_etcd_lease_ok", worker=name) == 1
        assert ("meshllm_worker_running_requests",
                frozenset({("model", MODEL), ("worker", name)})) in w1
        assert ("meshllm_worker_waiting_requests",
                frozenset({("model", MODEL), ("worker", name)})) in w1
    planner = scrape(f"http://127.0.0.1:{observed_mesh.metrics_ports['planner']}/metrics")
    assert total(planner, "process_cpu_seconds_total") > 0


def _row_cells(page: Page, request_id: str) -> list[str]:
    return list(page.evaluate(f"[...document.querySelector('#recent tbody "
                              f"tr[data-request=\"{request_id}\"]').cells]"
                              ".map(c => c.textContent)"))


def _assert_nodes_shown(page: Page, status: MeshStatus) -> None:
    page.wait_for("document.querySelectorAll('[data-node]').length === 2")
    nodes = page.evaluate("[...document.querySelectorAll('[data-node]')]"
                          ".map(n => n.dataset.node).sort()")
    assert nodes == ["worker-1", "worker-2"]
    for node in status.nodes:
        card = page.evaluate(f"document.querySelector('[data-node=\"{node.worker_id}\"]')"
                             ".textContent")
        assert node.worker_id in card and node.address in card and MODEL in card


def _assert_model_shown(page: Page, model: ModelStatus) -> None:
    badge = f"document.querySelector('[data-model=\"{MODEL}\"] .status')"
    assert page.evaluate(badge + ".textContent") == model.status_text == "serving"
    assert page.evaluate(badge + ".dataset.state") == ServingState.SERVING.value
    segments = page.evaluate(f"[...document.querySelectorAll('[data-placement=\"{MODEL}\"]"
                             " .segment')].map(s => [s.dataset.worker, s.dataset.layers])")
    expected = [[s.worker_id, f"{s.layer_start}-{s.layer_end}"]
                for r in model.replicas for s in r.stages]
    assert sorted(segments) == sorted(expected) and segments


def _assert_request_listed(page: Page, collector: Collector, answer: Mapping[str, Any]
                           ) -> None:
    """The console's row for the request the test made: its id, model, outcome, finish
    reason and token counts as the client got them, and its trace as the collector has it."""
    request_id = answer["id"]
    row = f"document.querySelector('#recent tbody tr[data-request=\"{request_id}\"]')"
    page.wait_for(f"{row} !== null")
    _, model, outcome, finish, tokens_in, tokens_out, ttft, total, _ = _row_cells(
        page, request_id)
    assert (model, outcome, finish) == (MODEL, "ok", answer["choices"][0]["finish_reason"])
    usage = answer["usage"]
    assert (int(tokens_in), int(tokens_out)) == (usage["prompt_tokens"],
                                                 usage["completion_tokens"])
    assert ttft and total
    trace_id = page.evaluate(f"{row}.dataset.trace")
    assert len(trace_id) == 32
    wait_until(lambda: any(s.trace_id == trace_id and s.name == f"chat {MODEL}"
                           for s in collector.snapshot()), 20, "the request's trace")


def _assert_suspect_shown(page: Page, mesh: ObservedMesh, node: NodeStatus) -> None:
    """A gateway's report on a live worker (under a short lease, as gateways write them)
    shows on its card; it answers the planner's health check, so it is only probed."""
    async def write() -> None:
        kv = EtcdStore(mesh.etcd_url)
        await kv.connect()
        try:
            worker = (await read_mesh(kv)).workers[WorkerId(node.worker_id)]
            report = SuspectReport(worker.worker_id, worker.started_at_unix_s, "gw-test",
                                   "stream failed: Socket closed", time.time())
            lease = await kv.grant_lease(10)
            await kv.put(SUSPECTS + node.worker_id, suspect_to_pb(report).SerializeToString(),
                         lease)
        finally:
            await kv.close()

    asyncio.run(write())
    line = f"document.querySelector('[data-node=\"{node.worker_id}\"] [data-suspect]')"
    page.wait_for(f"{line} !== null")
    text = page.evaluate(f"{line}.textContent")
    assert "gw-test: stream failed: Socket closed" in text, text
    assert text.startswith(("being probed", "left out")), text
    # The installed executable prints it under SUSPECTS, as the README shows.
    out = subprocess.run([str(Path(sys.executable).parent / "mesh-llm"), "status", "--etcd",
                          mesh.etcd_url], capture_output=True, text=True, timeout=30, check=True)
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith(node.worker_id)
                and "reported by gw-test" in x)
    assert "SUSPECTS (1, reported unreachable)" in out.stdout, out.stdout
    assert "stream failed: Socket closed" in line, line


def test_console_shows_the_mesh_and_updates_live(observed_mesh: ObservedMesh,
                                                 collector: Collector, tmp_path: Path) -> None:
    status = MeshStatus.from_json(observed_mesh.status())
    model = next(m for m in status.models if m.model_id == MODEL)
    browser = Browser(tmp_path / "chromium-profile")
    try:
        page = browser.open(observed_mesh.base_url + "/console")
        _assert_nodes_shown(page, status)
        _assert_model_shown(page, model)
        assert page.evaluate("document.getElementById('connection').textContent") == "live"
        # This mesh's gateway has no blackboard: the panel says so instead of "loading..."
        # (`mesh-llm up`'s has one: tests/integration/test_up_session.py sees "no posts yet").
        page.wait_for("document.getElementById('board')?.dataset.state === 'none'")
        assert page.evaluate("document.getElementById('board').textContent").startswith(
            "no blackboard configured on this gateway")
        _assert_suspect_shown(page, observed_mesh, status.nodes[0])
        answer = json.loads(chat(observed_mesh.base_url, max_tokens=8))
        _assert_request_listed(page, collector, answer)
        assert page.evaluate("document.querySelector('#recent tbody tr').dataset.request"
                             ) == answer["id"]  # newest first
        page.wait_for(f"parseFloat(document.querySelector('[data-model=\"{MODEL}\"] .rate')"
                      ".textContent) > 0")
        time.sleep(1.5)  # a few more updates: the sparkline gets some history
        page.screenshot(tmp_path / "console.png")
        assert (tmp_path / "console.png").stat().st_size > 10_000
    finally:
        browser.close()
