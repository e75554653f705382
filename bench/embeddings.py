"""Embeddings per second through the mesh against llama-server, same model, one run.

/v1/embeddings with batches of 1, 16 and 64 inputs (short sentences, each request with
texts of its own, the same for both), one request at a time, through (a) the whole mesh
path (gateway -> gRPC -> worker -> engine process, one worker) and (b) llama.cpp's C++
llama-server with `--embeddings --pooling mean`, built from the same vendored source by
scripts/build_llama_server.sh (skipped with a message when the binary is absent). Both use
the same threads and a 512-token physical batch; they take turns request by request, and
each cell's rate comes from its median request. Prints embeddings/s and the ratio
mesh / llama-server (target: at least 0.9), and the cosine of their vectors for one text.

    .venv/bin/python bench/embeddings.py [--threads 2] [--requests 15]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from meshllm.common.models import materialize  # noqa: E402
from meshllm.common.ports import PortPicker  # noqa: E402

from tests.support.mesh import LocalMesh, MeshOptions  # noqa: E402

MODEL = "gemma3-270m"
LLAMA_SERVER = ROOT / "build/llama-server/bin/llama-server"
BATCHES = (1, 16, 64)
SUBJECTS = ["the ocean", "a mountain town", "the printing press", "bees", "a lighthouse",
            "the first computers", "winter in a city", "a long train journey"]


def texts(batch: int, request_no: int) -> list[str]:
    """Distinct short sentences (10-14 tokens), never the same twice in a run."""
    return [f"Sentence {request_no}.{i} is a short note about {SUBJECTS[i % len(SUBJECTS)]}."
            for i in range(batch)]


def embed_once(http: httpx.Client, base_url: str, inputs: list[str]) -> float:
    """Seconds for one request embedding `inputs`."""
    started = time.perf_counter()
    r = http.post(f"{base_url}/v1/embeddings",
                  json={"model": MODEL, "input": inputs, "encoding_format": "float"})
    r.raise_for_status()
    assert len(r.json()["data"]) == len(inputs)
    return time.perf_counter() - started


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def start_llama_server(model: str, threads: int, stack: contextlib.ExitStack) -> str:
    port = PortPicker().pick()
    # As the mesh's embedding context: 512 KV cells shared by up to 64 sequences, so that a
    # request's inputs are decoded together, up to 512 tokens a batch (fewer slots, or one
    # KV stream per slot, measured slower for batches of 16 and 64).
    cmd = [str(LLAMA_SERVER), "-m", model, "--embeddings", "--pooling", "mean",
           "-c", "512", "--parallel", "64", "--kv-unified", "-b", "512", "-ub", "512",
           "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(stop, proc)
    deadline = time.time() + 120
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {' '.join(cmd)}")
        time.sleep(0.5)
    raise RuntimeError("llama-server did not come up")


def start_mesh(threads: int, stack: contextlib.ExitStack) -> str:
    root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    mesh = LocalMesh(root, MeshOptions(workers=1, threads=threads, worker_memory="4GiB"))
    mesh.start()
    stack.callback(mesh.stop)
    return mesh.base_url


def vector(base_url: str, text: str) -> list[float]:
    r = httpx.post(f"{base_url}/v1/embeddings", json={"model": MODEL, "input": text},
                   timeout=60)
    r.raise_for_status()
    return list(r.json()["data"][0]["embedding"])


def agreement(targets: dict[str, str]) -> None:
    """Whether both compute the same vectors: their cosine for one text."""
    if len(targets) < 2:
        return
    a, b = (vector(url, texts(1, -2)[0]) for url in targets.values())
    cosine = sum(x * y for x, y in zip(a, b, strict=True))  # both unit length
    print(f"cosine of mesh and llama-server vectors for one text: {cosine:.6f}")


Rates = dict[tuple[str, int], tuple[float, float]]  # (target, batch) -> (median, best)


def measure(targets: dict[str, str], requests: int) -> Rates:
    """Embeddings/s of each target and batch size from its median request time. The
    targets take turns request by request, the first alternating, so that the shared
    machine's noise hits both alike."""
    results: Rates = {}
    with httpx.Client(timeout=600) as http:
        for url in targets.values():  # warm-up: the mesh makes its embedding context lazily
            embed_once(http, url, texts(4, -1))
        for batch in BATCHES:
            times: dict[str, list[float]] = {name: [] for name in targets}
            for n in range(requests):
                names = list(targets) if n % 2 == 0 else list(reversed(targets))
                for name in names:  # both embed the same texts, new in each turn
                    times[name].append(embed_once(http, targets[name], texts(batch, n)))
            for name, seconds in times.items():
                results[(name, batch)] = (batch / statistics.median(seconds),
                                          batch / min(seconds))
                print(f"  {name:<13} batch {batch:>3}: median {statistics.median(seconds):.3f}"
                      f" s, min {min(seconds):.3f} s per request", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=15,
                    help="requests per target and batch size")
    args = ap.parse_args()
    model = str(materialize(MODEL))
    with contextlib.ExitStack() as stack:
        targets = {"mesh": start_mesh(args.threads, stack)}
        if LLAMA_SERVER.is_file():
            targets["llama-server"] = start_llama_server(model, args.threads, stack)
        agreement(targets)
        results = measure(targets, args.requests)
    if not LLAMA_SERVER.is_file():
        print(f"(b) skipped: {LLAMA_SERVER} is absent; build it with "
              "scripts/build_llama_server.sh")
    print(f"\n{MODEL}, {args.threads} threads, {args.requests} requests per target and "
          "batch size, taking turns; embeddings/s from the median request")
    print("(best: from each one's fastest request, the least disturbed by other load)")
    print(f"{'batch':>6}{'mesh emb/s':>12}{'llama-server':>14}{'ratio':>8}{'best ratio':>12}")
    for batch in BATCHES:
        ours, theirs = results[("mesh", batch)], results.get(("llama-server", batch))
        ratio = f"{ours[0] / theirs[0]:.2f}" if theirs else "-"
        best = f"{ours[1] / theirs[1]:.2f}" if theirs else "-"
        print(f"{batch:>6}{ours[0]:>12.1f}{theirs[0] if theirs else 0:>14.1f}{ratio:>8}"
              f"{best:>12}")


if __name__ == "__main__":
    main()
