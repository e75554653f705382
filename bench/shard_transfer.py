"""Expert shard transfer between workers (FetchShard) on loopback, against a plain copy of
the same file, in one run.

Writes (once) a synthetic MoE GGUF and cuts one shard of it into a sender's cache; a child
process serves it with the worker's own serving code (tests/support/shard_peer.py:
shard_serve.shard_chunks behind gRPC), and for --rounds rounds a second child receives it
with the worker's own receiver (shard_receive.fetch_shard: 1 MiB chunks, sha256 checked,
renamed into its cache), taking turns with shutil.copyfile and a sha256 of the file.
Prints medians in MB/s and the receiver's peak memory above its start (the transfer
streams: it should stay near a few chunks whatever the shard's size).

    .venv/bin/python bench/shard_transfer.py [--rounds 3] [--dir /tmp/shard-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshllm.common.models import describe  # noqa: E402
from meshllm.worker.shards import ensure_shard  # noqa: E402

from tests.support.moe_gguf import MoeSpec, moe_model  # noqa: E402

SELECTION = ((0, 1, 2, 3, 4, 5),) * 3
CLIENT = """
import asyncio, json, sys, time
from pathlib import Path
from meshllm.common.models import describe
from meshllm.common.shard_transfer import ShardRequest
from meshllm.worker.shard_receive import fetch_shard
from meshllm.worker.shard_source import PeerHolding

def hwm_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])

spec = describe(sys.argv[1], 512)
selection = tuple(tuple(layer) for layer in json.loads(sys.argv[4]))
peer = PeerHolding("sender", sys.argv[2], True, True)
request = ShardRequest(spec.model_id, spec.model_digest, selection, "bench")
before = hwm_kib()
started = time.perf_counter()
got = asyncio.run(fetch_shard([peer], request, Path(sys.argv[3]), lambda f: None))
print(json.dumps({"s": time.perf_counter() - started, "bytes": got.file_bytes,
                  "rss_before_kib": before, "rss_peak_kib": hwm_kib()}))
"""


def receive(model: Path, port: str, dst: Path) -> dict[str, float]:
    dst.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-c", CLIENT, str(model), f"127.0.0.1:{port}",
                          str(dst), json.dumps(SELECTION)],
                         capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def timed(action: str, src: Path, dst: Path) -> float:
    started = time.perf_counter()
    if action == "copyfile":
        shutil.copyfile(src, dst)
    else:
        with src.open("rb") as f:
            hashlib.file_digest(f, "sha256")
    return time.perf_counter() - started


def run(work: Path, rounds: int) -> None:
    model = moe_model(work, MoeSpec(n_ff=16384, n_head=2))
    spec = describe(str(model), 512)
    shard = ensure_shard(model, work / "sender", SELECTION, spec.model_digest)
    server = subprocess.Popen([sys.executable, "-m", "tests.support.shard_peer", str(model),
                               str(work / "sender")], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        receive(model, port, work / "warm.gguf")  # page cache and imports warm
        results: dict[str, list[float]] = {"transfer": [], "copyfile": [], "sha256": []}
        peaks = []
        for _ in range(rounds):
            got = receive(model, port, work / "receiver" / "shards" / shard.path.name)
            results["transfer"].append(got["s"])
            peaks.append((got["rss_peak_kib"] - got["rss_before_kib"]) / 1024)
            for action in ("copyfile", "sha256"):
                results[action].append(timed(action, shard.path, work / "copy.gguf"))
    finally:
        server.terminate()
        server.wait()
    mb = shard.file_bytes / 1e6
    print(f"shard {mb:.1f} MB of a {model.stat().st_size / 1e6:.1f} MB model, {rounds} rounds")
    for name, seconds in results.items():
        median = statistics.median(seconds)
        print(f"{name:>9}: {mb / median:7.1f} MB/s (median {median:.3f} s; "
              f"{', '.join(f'{s:.3f}' for s in seconds)})")
    ratio = statistics.median(results["copyfile"]) / statistics.median(results["transfer"])
    print(f"transfer / copyfile: {ratio:.2f}x; receiver peak memory above its start: "
          f"{', '.join(f'{p:.1f}' for p in peaks)} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/shard-transfer-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    run(args.dir, args.rounds)


if __name__ == "__main__":
    main()
