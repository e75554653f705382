"""`mesh-llm calibrate MODEL`: rank a mixture-of-experts model's experts by how often its
router chooses them over a prompt set, cache the ranking under the data directory and
publish it to the mesh's etcd, where the planner deals the most used experts to every shard.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

from meshllm.cli.status_cmd import etcd_target
from meshllm.cli.up_config import DEFAULT_DATA_DIR
from meshllm.common.moe import ExpertRanking
from meshllm.common.store import EtcdStore
from meshllm.common.tls import GrpcSecurity


def add_calibrate_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="rank a mixture-of-experts model's experts by use "
                       "and publish the ranking to the mesh")
    p.add_argument("model", help="a model name or the path of a .gguf file")
    p.add_argument("--prompts", type=Path, default=None,
                   help="a text file of prompts, paragraphs separated by blank lines "
                   "(default: a built-in set of prose, code, dialogue and numbers)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"where rankings are cached, under rankings/ (default {DEFAULT_DATA_DIR})"
                   "; also where `mesh-llm up` keeps the etcd address")
    p.add_argument("--etcd", default="", help="etcd URL (default: the one `up` started)")
    p.add_argument("--no-publish", action="store_true", help="rank and cache only")
    p.add_argument("--refresh", action="store_true", help="calibrate again even if cached")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--rpc", default="", help="for a model this node cannot hold: ggml RPC "
                   "servers (host:port,...; `python -m meshllm.worker.rpc_server --endpoint "
                   "HOST:PORT` on each) that run its last layers, as a layer split")
    p.add_argument("--rpc-layers", default="", help="layers on each --rpc server (N,...)")


def _progress(out: TextIO) -> Any:
    def show(done: int, total: int) -> None:
        out.write(f"\rcalibrating: {done}/{total} tokens")
        out.flush()
        if done == total:
            out.write("\n")

    return show


def summary(ranking: ExpertRanking, cached: bool) -> str:
    how = "cached" if cached else f"counted in {ranking.seconds:.1f} s"
    lines = [f"ranking {ranking.model_digest[:16]}: {ranking.tokens} tokens, "
             f"{len(ranking.counts)} MoE layers x {ranking.expert_count} experts ({how})"]
    for layer, counts in enumerate(ranking.counts):
        total = sum(counts) or 1
        top = ranking.layer_order(layer)[:4]
        shares = ", ".join(f"{e} {counts[e] / total:.0%}" for e in top)
        lines.append(f"  layer {layer}: most chosen (share of the choices) {shares}")
    return "\n".join(lines)


async def _publish(url: str, security: GrpcSecurity, ranking: ExpertRanking) -> str:
    from meshllm.worker.moe_calibrate import publish_ranking

    store = EtcdStore(url, security)
    await store.connect(wait_s=3.0)
    try:
        return await publish_ranking(store, ranking)
    finally:
        await store.close()


def run_calibrate(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from meshllm.common.models import materialize
    from meshllm.worker.moe_calibrate import cached_ranking, read_prompts

    model = materialize(args.model)
    stages = [e for e in args.rpc.split(",") if e]
    layers = [int(n) for n in args.rpc_layers.split(",") if n]
    ranking, cached = cached_ranking(
        model, Path(args.data_dir).expanduser(), read_prompts(args.prompts),
        threads=args.threads, refresh=args.refresh, progress=_progress(sys.stderr),
        stages=stages, stage_layers=layers)
    print(summary(ranking, cached), file=out)
    if not args.no_publish:
        key = asyncio.run(_publish(*etcd_target(args), ranking))
        print(f"published to {key}", file=out)
    return 0
