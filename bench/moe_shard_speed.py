"""An expert shard's decode speed and memory against the full model, on one engine, in one run.

A synthetic MoE model (tests/support/moe_gguf.py; Q8_0, 8 layers, 16 experts of which 4 are
used per token, sized so that the experts outweigh the 262k-token embedding and output) and
its shard holding half the experts (8 of 16, the even ones) each run in a child process as
the worker's engine runs them (BatchEngine, weight repacking off, 1 thread), alternating for
--rounds rounds: decode tok/s of a greedy generation, and the process's memory (VmRSS after
it, VmHWM) over the model file's bytes. Prints medians and shard / full ratios. mesh-llm's
mission cites about 1.0x speed at 0.58x memory for Qwen3-30B-A3B with half the experts: the
compute per token is the same (as many experts are used), the memory follows the weights.

    .venv/bin/python bench/moe_shard_speed.py [--rounds 3] [--tokens 64] [--dir /tmp/moe-bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshllm.common.gguf import read_header  # noqa: E402
from meshllm.common.moe import moe_layout, shard_bytes  # noqa: E402
from meshllm.worker.moe_shard import write_shard  # noqa: E402

from tests.support.moe_gguf import MoeSpec, moe_model  # noqa: E402

SPEC = MoeSpec(quant="Q8_0", n_layer=8, n_embd=256, n_ff=2048, n_head=8, n_head_kv=4,
               n_expert=16, n_expert_used=4)

CHILD = """
import json, statistics, sys
sys.path.insert(0, sys.argv[3])
from bench.split_driver import generate, load

def status_kib(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1])

engine = load(sys.argv[1], [], [], "meshllm")
generate(engine, 0, 4)  # the first run pays for the pages it faults in
runs = [generate(engine, i + 1, int(sys.argv[2])) for i in range(2)]
print(json.dumps({"s_per_token": statistics.median(r["s_per_token"] for r in runs),
                  "tokens": runs[-1]["tokens"], "rss_kib": status_kib("VmRSS"),
                  "hwm_kib": status_kib("VmHWM")}))
"""


def run(model: Path, tokens: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tokens), str(ROOT)],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def report(name: str, model: Path, runs: list[dict[str, float]],
           base: dict[str, float] | None) -> dict[str, float]:
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    size = model.stat().st_size
    speed = 1 / med["s_per_token"]
    line = (f"{name:>22}: {speed:6.1f} tok/s, RSS {med['rss_kib'] / 1024:6.0f} MiB "
            f"(peak {med['hwm_kib'] / 1024:.0f}), file {size / 2**20:.0f} MiB, "
            f"RSS/file {med['rss_kib'] * 1024 / size:.2f}")
    if base is not None:
        line += (f"; vs full: speed {speed * base['s_per_token']:.2f}x, "
                 f"RSS {med['rss_kib'] / base['rss_kib']:.2f}x, "
                 f"peak {med['hwm_kib'] / base['hwm_kib']:.2f}x")
    print(line, flush=True)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    model = moe_model(args.dir, SPEC)
    layout = moe_layout(read_header(model))
    assert layout is not None
    half = args.dir / f"{model.stem}-half.gguf"
    write_shard(model, half, list(range(0, SPEC.n_expert, 2)))
    print(f"model {model.name}: trunk {layout.trunk_bytes / 2**20:.0f} MiB, experts "
          f"{layout.expert_count * layout.bytes_per_expert / 2**20:.0f} MiB; half the experts "
          f"weigh {shard_bytes(layout, 8) / layout.total_bytes:.2f} of the whole")
    print(f"{args.rounds} rounds alternating, {args.tokens} tokens each, 1 thread, medians")
    full_runs, half_runs = [], []
    for _ in range(args.rounds):
        full_runs.append(run(model, args.tokens))
        half_runs.append(run(half, args.tokens))
    base = report("full model", model, full_runs, None)
    report("shard, 8 of 16 experts", half, half_runs, base)
    half.unlink()


if __name__ == "__main__":
    main()
