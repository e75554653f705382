"""`mesh-llm status`: nodes, their capacity, and which worker hosts which model."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from meshllm.cli.local_mesh import read_local_mesh
from meshllm.cli.up_config import DEFAULT_DATA_DIR
from meshllm.common.config import ETCD_OPTION, format_size, process_env
from meshllm.common.demand import ModelDemand, merged
from meshllm.common.meshview import read_mesh
from meshllm.common.status import (
    ABSENT,
    HostedModel,
    MeshStatus,
    NodeStatus,
    ReplicaStatus,
    mesh_status,
)
from meshllm.common.status_experts import ExpertStatus
from meshllm.common.status_suspects import SuspectStatus
from meshllm.common.store import EtcdStore
from meshllm.common.tls import PLAINTEXT, GrpcSecurity, security_from_env


def add_status_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="print the mesh: nodes, capacity, placements")
    p.add_argument("--etcd", default="", help="etcd URL (default: the one `up` started)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"where `mesh-llm up` keeps its state (default {DEFAULT_DATA_DIR})")
    p.add_argument("--json", action="store_true", help="print JSON")


def etcd_target(args: argparse.Namespace) -> tuple[str, GrpcSecurity]:
    """--etcd with the MESHLLM_TLS_* certificate, else the etcd of the `mesh-llm up` of
    --data-dir with its certificate (a mesh's etcd over TLS admits only holders of one)."""
    local = None if args.etcd else read_local_mesh(Path(args.data_dir).expanduser())
    if local is not None and local.certs is not None:
        return local.etcd_url, local.certs.security()
    url = args.etcd or (local.etcd_url if local is not None else ETCD_OPTION.default or "")
    return str(url), security_from_env("mesh-llm status", process_env())


async def read_status(url: str, security: GrpcSecurity = PLAINTEXT) -> MeshStatus:
    kv = EtcdStore(url, security)
    await kv.connect(wait_s=3.0)
    try:
        snapshot = await read_mesh(kv)
        return mesh_status(snapshot, merged(snapshot.demand.values()))
    finally:
        await kv.close()


def demand_line(d: ModelDemand) -> str:
    idle = "never requested" if d.idle_s == float("inf") else f"idle {d.idle_s:.0f} s"
    waiting = f", {d.waiting_requests} waiting for a replica" if d.waiting_requests else ""
    return (f"    demand: {d.requests_per_s:.2f} req/s ({d.refused_per_s:.2f} refused), "
            f"{d.generated_tokens_per_s:.1f} tok/s, queue wait {d.mean_queue_wait_s:.2f} s, "
            f"service {d.mean_service_s:.2f} s over {d.window_s:.0f} s, {idle}{waiting}")


def _latency_lines(nodes: tuple[NodeStatus, ...]) -> list[str]:
    measured = [(n.worker_id, peer, rtt) for n in nodes for peer, rtt in n.rtt_ms.items()]
    if not measured:
        return []
    return ["LINKS (round trip, measured by the first worker)"] + [
        f"  {a} -> {b}: {rtt:.2f} ms" for a, b, rtt in measured]


def _node_line(n: NodeStatus) -> str:
    models = ", ".join(f"{m.model_id} [{_hosted(m)}]" for m in n.models) or "-"
    return (f"  {n.worker_id:<16} {n.address:<22} {n.backend:<6} "
            f"{format_size(n.memory_budget_bytes):>10} {n.threads:>2} threads"
            f"  models: {models}")


def suspect_lines(suspects: tuple[SuspectStatus, ...]) -> list[str]:
    """The workers reported unreachable; none printed while there are none. Times in UTC:
    the same whichever machine the status is read on."""
    if not suspects:
        return []
    return [f"SUSPECTS ({len(suspects)}, reported unreachable)"] + [
        f"  {s.worker_id:<16} {s.state_text} since "
        f"{time.strftime('%H:%M:%S UTC', time.gmtime(s.since_unix_s))}; "
        f"reported by {s.reporter}: {s.reason or '(no reason given)'}" for s in suspects]


def _hosted(m: HostedModel) -> str:
    state = "draining" if m.draining else m.state.value
    return f"{state} {m.running}/{m.slots} slots" if m.slots else state


def _replica_lines(i: int, r: ReplicaStatus) -> list[str]:
    kind = f"split over {len(r.stages)} workers" if r.split else "whole"
    if r.retiring:
        kind += ", retiring: takes no new requests, unloads when its streams end"
    lines = [f"    replica {i} ({kind})"]
    for j, s in enumerate(r.stages):
        rtt = r.link_rtt_ms.get(s.worker_id)
        link = f"  link {rtt:.2f} ms" if rtt is not None else ""
        role = "head " if j == 0 else "stage"
        state = s.state.value if s.state else ABSENT
        lines.append(f"      {role} {s.worker_id:<16} layers {s.layer_start:>2}-"
                     f"{s.layer_end - 1:<3} {state}{link}")
    return lines


def expert_lines(e: ExpertStatus) -> list[str]:
    copies = "some expert is on no live shard" if not e.coverage else (
        f"every expert on at least {e.coverage} shard{'s' if e.coverage > 1 else ''}")
    lines = [f"    expert shards: {len(e.shards)} of {e.expert_count} experts x "
             f"{e.moe_layers} MoE layers; coverage {e.coverage} ({copies}); {e.ranking}"
             + (f", hot share {e.hot_share:g}" if e.calibration_tokens else "")]
    lines.extend(f"      {s.worker_id:<16} {s.summary}" for s in e.shards)
    return lines


def render(status: MeshStatus) -> str:
    lines = [f"NODES ({len(status.nodes)})", *map(_node_line, status.nodes),
             *suspect_lines(status.suspects)]
    lines.append(f"MODELS ({len(status.models)})")
    for m in status.models:
        need = format_size(m.required_bytes) if m.required_bytes else "?"
        lines.append(f"  {m.model_id:<16} needs {need:>10}  {m.status_text}")
        if m.demand is not None:
            lines.append(demand_line(m.demand))
        for i, r in enumerate(m.replicas, 1):
            lines.extend(_replica_lines(i, r))
        if m.experts is not None:
            lines.extend(expert_lines(m.experts))
    lines.extend(_latency_lines(status.nodes))
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    status = asyncio.run(read_status(*etcd_target(args)))
    print(json.dumps(status.to_json(), indent=2) if args.json else render(status))
    return 0
