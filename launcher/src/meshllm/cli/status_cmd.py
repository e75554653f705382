"""`mesh-llm status`: nodes, their capacity, and which worker hosts which model."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from meshllm.common.config import format_size
from meshllm.common.meshview import read_mesh
from meshllm.common.status import mesh_status
from meshllm.common.store import EtcdStore


def add_status_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="print the mesh: nodes, capacity, placements")
    p.add_argument("--etcd", default="", help="etcd URL (default: the one `up` started)")
    p.add_argument("--data-dir", default=str(Path.home() / ".local/share/mesh-llm"))
    p.add_argument("--json", action="store_true", help="print JSON")


def etcd_url(args: argparse.Namespace) -> str:
    if args.etcd:
        return str(args.etcd)
    state = Path(args.data_dir).expanduser() / "mesh.json"
    if state.exists():
        return str(json.loads(state.read_text())["etcd"])
    return "http://127.0.0.1:2379"


async def read_status(url: str) -> dict[str, Any]:
    kv = EtcdStore(url)
    await kv.connect(wait_s=3.0)
    try:
        return mesh_status(await read_mesh(kv))
    finally:
        await kv.close()


def _latency_lines(nodes: list[dict[str, Any]]) -> list[str]:
    measured = [(n["worker_id"], peer, rtt) for n in nodes for peer, rtt in n["rtt_ms"].items()]
    if not measured:
        return []
    return ["LINKS (round trip, measured by the first worker)"] + [
        f"  {a} -> {b}: {rtt:.2f} ms" for a, b, rtt in measured]


def render(status: dict[str, Any]) -> str:
    lines = [f"NODES ({len(status['nodes'])})"]
    for n in status["nodes"]:
        models = ", ".join(f"{m} [{s['state']}]" for m, s in n["models"].items()) or "-"
        lines.append(f"  {n['worker_id']:<16} {n['address']:<22} {n['backend']:<6} "
                     f"{format_size(n['memory_budget_bytes']):>10} {n['threads']:>2} threads"
                     f"  models: {models}")
    lines.append(f"MODELS ({len(status['models'])})")
    for m in status["models"]:
        need = format_size(m["required_bytes"]) if m["required_bytes"] else "?"
        lines.append(f"  {m['model_id']:<16} needs {need:>10}  {m['status']}")
        for i, r in enumerate(m["replicas"], 1):
            kind = f"split over {len(r['stages'])} workers" if r["split"] else "whole"
            lines.append(f"    replica {i} ({kind})")
            for j, s in enumerate(r["stages"]):
                lo, hi = s["layers"]
                rtt = r["link_rtt_ms"].get(s["worker_id"])
                link = f"  link {rtt:.2f} ms" if rtt is not None else ""
                role = "head " if j == 0 else "stage"
                lines.append(f"      {role} {s['worker_id']:<16} layers {lo:>2}-{hi - 1:<3} "
                             f"{s['state']}{link}")
    lines.extend(_latency_lines(status["nodes"]))
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    status = asyncio.run(read_status(etcd_url(args)))
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0
