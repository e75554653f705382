"""Expert ranking by calibration: the full model runs over a prompt set and the router's
choices are counted per MoE layer and expert (moe_probe reads llama.cpp's `ffn_moe_topk-N`).

The planner deals the most chosen experts to every shard; a ranking is cached by the model
file's sha256 under `<data_dir>/rankings/<digest>.json`, with the digest of the prompts it
was counted over (other prompts count again), and published to etcd under
store.MOE_RANKINGS + digest by `mesh-llm calibrate`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from meshllm.common.convert import ranking_to_pb
from meshllm.common.errors import ModelSourceError
from meshllm.common.gguf import read_header
from meshllm.common.moe import (
    ExpertRanking,
    MoeLayout,
    UnsupportedMoeLayout,
    expert_blocks,
    model_digest,
    moe_layout,
)
from meshllm.common.store import MOE_RANKINGS, KeyValueStore

TokenProgress = Callable[[int, int], None]  # (tokens evaluated, tokens in all)

# Varied on purpose: routers specialise by kind of text, so a ranking over one kind would
# keep the experts of that kind only.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The river had been rising for three days when the villagers finally agreed to move the "
    "grain to the old mill on the hill. Nobody said it aloud, but everyone remembered the "
    "flood of their grandparents' time, when the water reached the church steps and stayed "
    "there for a week.",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
    "    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
    "        else:\n            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n",
    "- Could you tell me where the station is?\n- Of course. Go straight on, take the second "
    "left, and it's just past the bakery.\n- Thank you! Is it far?\n- Ten minutes on foot, "
    "five if you hurry. The train leaves at half past, doesn't it?",
    "Quarterly revenue rose 12.4% to $3.81 billion, against 3.39 billion a year earlier; "
    "operating margin was 18.2%. In 2023 the company shipped 41,250 units, in 2024 57,900. "
    "7 x 8 = 56, 144 / 12 = 12, and the square root of 2 is about 1.41421.",
    "Photosynthesis converts light energy into chemical energy: chlorophyll absorbs red and "
    "blue light, water is split, oxygen is released, and carbon dioxide is fixed into sugars "
    "through the Calvin cycle in the stroma of the chloroplast.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = "
    "customers.id WHERE orders.created_at > '2024-01-01' GROUP BY name ORDER BY orders DESC;",
)


class NotAMoeModel(UnsupportedMoeLayout):
    """Calibration was asked for a dense model: it has no router to count."""


def read_prompts(path: Path | None) -> tuple[str, ...]:
    """The prompts of a file (paragraphs separated by blank lines), or the built-in set."""
    if path is None:
        return DEFAULT_PROMPTS
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelSourceError(f"cannot read the prompt file {path}: {exc}") from exc
    prompts = tuple(p.strip() for p in text.split("\n\n") if p.strip())
    if not prompts:
        raise ModelSourceError(f"the prompt file {path} holds no text: write paragraphs "
                               "separated by blank lines")
    return prompts


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def _layout(model: Path) -> tuple[MoeLayout, tuple[int, ...]]:
    header = read_header(model)
    layout = moe_layout(header)
    if layout is None:
        raise NotAMoeModel(f"{model} is a dense model: it has no experts to rank")
    return layout, expert_blocks(header)


class _Counter:
    """Selections per (MoE layer, expert), fed by the probe's router callback."""

    def __init__(self, layout: MoeLayout, blocks: Sequence[int]) -> None:
        self.counts = np.zeros((layout.moe_layers, layout.expert_count), dtype=np.int64)
        self.layer_of = {block: i for i, block in enumerate(blocks)}

    def __call__(self, block: int, ids: np.ndarray) -> None:
        layer = self.layer_of.get(block)
        if layer is not None:
            np.add.at(self.counts[layer], ids.ravel(), 1)


def calibrate(model: Path, prompts: Sequence[str] = DEFAULT_PROMPTS, *, threads: int = 1,
              n_ctx: int = 512, progress: TokenProgress | None = None,
              digest: str | None = None, stages: Sequence[str] = (),
              stage_layers: Sequence[int] = ()) -> ExpertRanking:
    """Runs the full model over `prompts` (each from an empty cache, cut to n_ctx tokens)
    and counts the router's choices; with `stages`, as a layer split whose last
    stage_layers[i] layers run on the RPC server stages[i] (a model no node holds)."""
    from meshllm.worker.moe_probe import ProbedModel  # loads llama.cpp

    layout, blocks = _layout(model)
    digest = digest or model_digest(model)
    counter = _Counter(layout, blocks)
    started = time.perf_counter()
    with ProbedModel(model, n_ctx=n_ctx, threads=threads, router=counter, stages=stages,
                     stage_layers=stage_layers) as probe:
        texts = [probe.tokenize(p)[:n_ctx] for p in prompts]
        total, done = sum(len(t) for t in texts), 0
        for tokens in texts:
            probe.clear()
            probe.evaluate(tokens, keep=False)
            done += len(tokens)
            if progress is not None:
                progress(done, total)
    _check_counted(counter.counts, total * layout.expert_used_count, model)
    counts = tuple(tuple(int(c) for c in layer) for layer in counter.counts)
    return ExpertRanking(digest, counts, total, time.perf_counter() - started)


def _check_counted(counts: np.ndarray, expected: int, model: Path) -> None:
    """Every token chose expert_used_count experts in every MoE layer: anything else means
    the router's tensors were not found or not read (another llama.cpp naming them
    otherwise), and a ranking from them would mislead the planner."""
    seen = sorted({int(c) for c in counts.sum(axis=1)})
    if seen != [expected]:
        raise ModelSourceError(
            f"calibrating {model}: the router's choices per layer add up to {seen}, not "
            f"{expected} (tokens x expert_used_count): this llama.cpp does not expose "
            "ffn_moe_topk-N tensors as expected")


def ranking_path(data_dir: Path, digest: str) -> Path:
    return data_dir / "rankings" / f"{digest}.json"


def load_ranking(data_dir: Path, digest: str, prompts: Sequence[str]) -> ExpertRanking | None:
    """The cached ranking of the model with `digest` over these prompts, None if absent."""
    try:
        raw = json.loads(ranking_path(data_dir, digest).read_text())
        if raw.get("prompts_sha256") != prompts_digest(prompts):
            return None
        return ExpertRanking(raw["model_digest"], tuple(tuple(layer) for layer in raw["counts"]),
                             int(raw["tokens"]), float(raw["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: calibrate again


def save_ranking(data_dir: Path, ranking: ExpertRanking, prompts: Sequence[str]) -> Path:
    path = ranking_path(data_dir, ranking.model_digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({
        "model_digest": ranking.model_digest, "counts": [list(c) for c in ranking.counts],
        "tokens": ranking.tokens, "seconds": ranking.seconds,
        "prompts_sha256": prompts_digest(prompts)}))
    partial.replace(path)
    return path


def cached_ranking(model: Path, data_dir: Path, prompts: Sequence[str] = DEFAULT_PROMPTS, *,
                   threads: int = 1, refresh: bool = False,
                   progress: TokenProgress | None = None, stages: Sequence[str] = (),
                   stage_layers: Sequence[int] = ()) -> tuple[ExpertRanking, bool]:
    """The model's ranking over `prompts` and whether it came from the cache (calibrating
    and caching it when it did not)."""
    _layout(model)  # a dense model is refused before its file is hashed
    digest = model_digest(model)
    if not refresh:
        cached = load_ranking(data_dir, digest, prompts)
        if cached is not None:
            return cached, True
    ranking = calibrate(model, prompts, threads=threads, progress=progress, digest=digest,
                        stages=stages, stage_layers=stage_layers)
    save_ranking(data_dir, ranking, prompts)
    return ranking, False


def ranking_key(digest: str) -> str:
    return MOE_RANKINGS + digest


async def publish_ranking(store: KeyValueStore, ranking: ExpertRanking) -> str:
    """Puts the ranking where planners read it; returns the key."""
    key = ranking_key(ranking.model_digest)
    await store.put(key, ranking_to_pb(ranking).SerializeToString())
    return key
