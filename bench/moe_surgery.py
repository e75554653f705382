"""Expert surgery throughput against a plain copy of the same file, in one run.

Writes (once) a synthetic MoE GGUF (tests/support/moe_gguf.py: llama arch, random weights,
gemma3's tokenizer), then alternates, for --rounds rounds: a plain copy of the file
(shutil.copyfile, the kernel's fast path, and a 4 MiB read/write loop) and shards holding
all, half and a quarter of the experts, each cut in a child process that reports its peak
RSS (VmHWM). Prints medians in MB/s of bytes written, the ratio to each copy, the same
without the header parse (a fixed cost: the tokenizer's arrays), and peak memory.

    .venv/bin/python bench/moe_surgery.py [--quant Q8_0] [--rounds 3] [--dir /tmp/moe-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.moe_gguf import MoeSpec, moe_model  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
from meshllm.common.gguf import read_header
from meshllm.worker.moe_shard import write_shard

def hwm_kib():  # this process's own peak (ru_maxrss would count the parent's, from fork)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])

before = hwm_kib()
started = time.perf_counter()
written = write_shard(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
seconds = time.perf_counter() - started
started = time.perf_counter()  # after the cut, as warm as the parse inside it
read_header(Path(sys.argv[1]))
header_s = time.perf_counter() - started
print(json.dumps({"s": seconds, "header_s": header_s, "bytes": written.file_bytes,
                  "rss_before_kib": before, "rss_peak_kib": hwm_kib()}))
"""


def copy_loop(src: Path, dst: Path) -> None:
    with src.open("rb") as f, dst.open("wb") as out:
        while chunk := f.read(4 << 20):
            out.write(chunk)


def timed_copy(copy: str, src: Path, dst: Path) -> float:
    started = time.perf_counter()
    if copy == "copyfile":
        shutil.copyfile(src, dst)
    else:
        copy_loop(src, dst)
    seconds = time.perf_counter() - started
    dst.unlink()
    return src.stat().st_size / seconds / 1e6


def surgery(src: Path, dst: Path, experts: list[int]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), json.dumps(experts)],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result: dict[str, float] = json.loads(out)
    dst.unlink()
    return result


def report(model: Path, copies: dict[str, list[float]],
           shards: dict[str, list[dict[str, float]]]) -> None:
    size = model.stat().st_size
    print(f"model {model.name}: {size / 1e6:.1f} MB")
    medians = {name: statistics.median(v) for name, v in copies.items()}
    for name, mbs in medians.items():
        print(f"plain copy ({name}): {mbs:8.1f} MB/s")
    for name, runs in shards.items():
        mbs = statistics.median(r["bytes"] / r["s"] / 1e6 for r in runs)
        peak = max(r["rss_peak_kib"] for r in runs) / 1024
        grown = max(r["rss_peak_kib"] - r["rss_before_kib"] for r in runs) / 1024
        ratios = "  ".join(f"{mbs / m:.2f}x {n}" for n, m in medians.items())
        header = statistics.median(r["header_s"] for r in runs)
        data = statistics.median(r["bytes"] / (r["s"] - r["header_s"]) / 1e6 for r in runs)
        print(f"surgery {name:>14}: {mbs:7.1f} MB/s ({ratios}); without the header parse "
              f"({header:.2f} s) {data:7.1f} MB/s; peak RSS {peak:.0f} MiB, "
              f"+{grown:.1f} MiB over the idle process (model {size / 2**20:.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quant", default="Q8_0", choices=["F16", "Q8_0"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    spec = MoeSpec(quant=args.quant, n_layer=8, n_embd=128, n_ff=1024, n_head=8, n_head_kv=4,
                   n_expert=16, n_expert_used=4)
    model = moe_model(args.dir, spec)
    n = spec.n_expert
    deals = {f"all {n} experts": list(range(n)), f"{n // 2} of {n}": list(range(0, n, 2)),
             f"{n // 4} of {n}": list(range(1, n, 4))}
    copies: dict[str, list[float]] = {"copyfile": [], "read/write": []}
    shards: dict[str, list[dict[str, float]]] = {name: [] for name in deals}
    out = args.dir / "out.gguf"
    for _ in range(args.rounds):
        for name in copies:
            copies[name].append(timed_copy(name, model, out))
        for name, experts in deals.items():
            shards[name].append(surgery(model, out, experts))
    report(model, copies, shards)


if __name__ == "__main__":
    main()
