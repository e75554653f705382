"""Bytes exchanged between nodes per generated token: expert shards against a layer split
of the same mixture-of-experts model, in one run.

An expert shard is a whole model in one process (the trunk and some experts): generating a
token sends nothing to another worker, only the token to the gateway, as any replica does.
The layer split of the same synthetic model (bench/moe_shard_speed.py's, 8 layers: the last
4 on a ggml RPC stage server) runs a head process (bench/split_driver.py) whose RPC
connection passes through a byte-counting proxy (bench/proxy.py): the ggml RPC bytes that
the worker's tunnel carries between nodes (its gRPC framing adds a few bytes per message).
Bytes per token are those of an n-token run less a 1-token run, over n-1.
The shard runs in the same driver without stages, so its count is a measurement too (of a
connection it never opens). Also prints both decode speeds, the whole model's as baseline.

    .venv/bin/python bench/moe_bytes.py [--tokens 48] [--dir /tmp/moe-bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshllm.worker.moe_shard import write_shard  # noqa: E402

from bench.moe_shard_speed import SPEC  # noqa: E402
from bench.pipeline_split import Head, decode_cost, start_rpc_servers  # noqa: E402
from bench.proxy import DelayProxy  # noqa: E402
from tests.support.moe_gguf import moe_model  # noqa: E402

STAGE_LAYERS = 4


def measure(heads: dict[str, tuple[Head, list[DelayProxy]]], tokens: int, rounds: int
            ) -> dict[str, tuple[float, int]]:
    """(median seconds per token, median bytes per token) of each head, the heads taking
    turns for `rounds` rounds (the machine's noise drifts)."""
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in heads}
    for _ in range(rounds):
        for name, (head, proxies) in heads.items():
            runs[name].append(decode_cost(head, proxies, tokens))
    return {name: (statistics.median(r[0] for r in rs), int(statistics.median(r[1] for r in rs)))
            for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    model = moe_model(args.dir, SPEC)
    shard = args.dir / f"{model.stem}-half.gguf"
    write_shard(model, shard, list(range(0, SPEC.n_expert, 2)))
    with tempfile.TemporaryDirectory() as tmp:
        servers = start_rpc_servers(1, Path(tmp))
        proxy = DelayProxy(("127.0.0.1", servers[0][1]))
        heads: dict[str, tuple[Head, list[DelayProxy]]] = {}
        try:
            heads["split"] = (Head([f"127.0.0.1:{proxy.port}"], [STAGE_LAYERS], str(model)),
                              [proxy])
            load_bytes = proxy.counters.to_server + proxy.counters.to_client
            heads["whole"] = (Head([], [], str(model)), [])
            heads["shard"] = (Head([], [], str(shard)), [])  # no stage to reach
            result = measure(heads, args.tokens, args.rounds)
        finally:
            for head, _ in heads.values():
                head.close()
            servers[0][0].kill()
    shard.unlink()
    report(model, args, result, load_bytes)


def report(model: Path, args: argparse.Namespace, result: dict[str, tuple[float, int]],
           load_bytes: int) -> None:
    whole_s = result["whole"][0]
    print(f"model {model.name}, {args.tokens} tokens, {args.rounds} rounds taking turns, "
          "1 thread per process, loopback, medians")
    print(f"  whole model (baseline): {1 / whole_s:6.1f} tok/s")
    split_s, split_bytes = result["split"]
    print(f"  layer split, {STAGE_LAYERS} of {SPEC.n_layer} layers on 1 stage: "
          f"{split_bytes} bytes/token between nodes ({1 / split_s:6.1f} tok/s, "
          f"{whole_s / split_s:.2f}x the whole model's speed; loading sent "
          f"{load_bytes / 1e6:.1f} MB)")
    shard_s, shard_bytes = result["shard"]
    print(f"  expert shard, 8 of 16 experts: {shard_bytes} bytes/token between nodes "
          f"({1 / shard_s:6.1f} tok/s, {whole_s / shard_s:.2f}x the whole model's speed)")


if __name__ == "__main__":
    main()
