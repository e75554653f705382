"""What an expert shard costs in quality, calibrated against an even deal, in one run.

On the synthetic MoE model with a skewed router (tests/support/moe_gguf.py, router_skew:
some experts are chosen much more often, in another order per layer, as in trained models),
the full model and shards run over a fixed text (not the calibration prompts), teacher
forced, and each shard's next-token distributions are compared with the full model's:

  KL          mean KL(full || shard) over the text's positions, nats
  agreement   share of positions where the shard's greedy token is the full model's

for shards holding 25, 50 and 75% of the experts:
  top-k       each layer's most chosen experts (the ranking of moe_calibrate, counted over
              its default prompts): the best a shard of that size can do
  rotations   the shards of a deal blind to use (experts spread evenly, every rotation),
              averaged
  planner     the planner's own deal over 3 shards (planner.experts.deal: the hot share of
              the ranking on every shard, the rest dealt out), with the ranking (calibrated)
              and without it (even), averaged over the 3 shards

The baseline, measured in the same run, is the full model against a shard holding every
expert in another order (KL 0 and agreement 1 when the surgery is exact); the ratios printed
are rotations KL / top-k KL and the planner's even KL / calibrated KL. Also: calibration
time against a plain evaluation of the same tokens (the eval callback's overhead).

    .venv/bin/python bench/moe_quality.py [--skew 1.0] [--tokens 160] [--dir /tmp/moe-bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshllm.common.gguf import read_header  # noqa: E402
from meshllm.common.moe import ExpertRanking, MoeLayout, moe_layout  # noqa: E402
from meshllm.planner.experts import DEFAULT_HOT_SHARE, deal  # noqa: E402
from meshllm.worker.moe_calibrate import DEFAULT_PROMPTS, calibrate  # noqa: E402
from meshllm.worker.moe_probe import ProbedModel  # noqa: E402
from meshllm.worker.moe_shard import write_shard  # noqa: E402

from tests.support.moe_gguf import MoeSpec, moe_model  # noqa: E402

TEXT = (
    "At dawn the fishing boats left the harbour one after another, their lamps still lit. "
    "Maria counted them from the window: eleven, twelve, thirteen. Her brother had promised "
    "to be back before the storm, but the radio said the wind would turn by noon. "
    "for i in range(10):\n    total += prices[i] * 1.2\nprint(f'total: {total:.2f}')\n"
    "- Are you coming tonight?\n- Only if the train is on time. It was 40 minutes late "
    "yesterday, and 25 on Monday.\n- Then take the 6:15 bus instead."
)
Selection = tuple[tuple[int, ...], ...]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def compare(full: np.ndarray, path: Path, tokens: Sequence[int]) -> tuple[float, float]:
    """(mean KL(full || shard), greedy agreement) over every position of `tokens`."""
    with ProbedModel(path, n_ctx=len(tokens) + 8) as probe:
        logits = probe.evaluate(tokens)
    kls, agree = [], 0
    for start in range(0, len(tokens), 32):  # float64 rows of 262k: a few at a time
        p_log = log_softmax(full[start:start + 32])
        q_log = log_softmax(logits[start:start + 32])
        kls.extend((np.exp(p_log) * (p_log - q_log)).sum(axis=1))
        agree += int((full[start:start + 32].argmax(1) == logits[start:start + 32].argmax(1))
                     .sum())
    return float(np.mean(kls)), agree / len(tokens)


def even_deals(n_expert: int, k: int, layers: int) -> list[Selection]:
    """Every rotation of k experts spread evenly over n_expert, the same in every layer."""
    base = [round(i * n_expert / k) for i in range(k)]
    deals = {tuple(sorted((b + r) % n_expert for b in base)) for r in range(n_expert)}
    return [tuple(d for _ in range(layers)) for d in sorted(deals)]


def calibrated_deal(ranking: ExpertRanking, k: int) -> Selection:
    return tuple(tuple(sorted(ranking.layer_order(layer)[:k]))
                 for layer in range(len(ranking.counts)))


def planner_deals(layout: MoeLayout, k: int, ranking: ExpertRanking | None
                  ) -> list[Selection]:
    return deal(layout, [k, k, k], ranking, DEFAULT_HOT_SHARE)


def shard_quality(model: Path, full: np.ndarray, tokens: Sequence[int], tmp: Path,
                  deals: Sequence[Selection]) -> tuple[float, float]:
    results = []
    for i, selection in enumerate(deals):
        path = tmp / f"shard-{i}.gguf"
        write_shard(model, path, selection)
        results.append(compare(full, path, tokens))
        path.unlink()
    return statistics.mean(r[0] for r in results), statistics.mean(r[1] for r in results)


def calibration_cost(model: Path) -> tuple[ExpertRanking, float]:
    """The ranking, and the seconds a plain evaluation of the same prompts takes."""
    ranking = calibrate(model, DEFAULT_PROMPTS)
    with ProbedModel(model) as probe:
        texts = [probe.tokenize(p) for p in DEFAULT_PROMPTS]
        started = time.perf_counter()
        for tokens in texts:
            probe.clear()
            probe.evaluate(tokens, keep=False)
        plain_s = time.perf_counter() - started
    return ranking, plain_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skew", type=float, default=1.0)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    spec = MoeSpec(n_expert_used=2, router_skew=args.skew)
    model = moe_model(args.dir, spec)
    ranking, plain_s = calibration_cost(model)
    print(f"model {model.name}: {spec.n_layer} MoE layers x {spec.n_expert} experts, "
          f"{spec.n_expert_used} used per token")
    print(f"calibration: {ranking.tokens} tokens in {ranking.seconds:.2f} s with the model's "
          f"load ({ranking.tokens / ranking.seconds:.0f} tok/s); a plain evaluation of the "
          f"same tokens, without load, {plain_s:.2f} s: {ranking.seconds / plain_s:.2f}x")
    with ProbedModel(model, n_ctx=args.tokens + 8) as probe:
        tokens = probe.tokenize(TEXT)[:args.tokens]
        full = probe.evaluate(tokens)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        permuted = tuple(tuple(reversed(range(spec.n_expert))) for _ in range(spec.n_layer))
        kl0, agree0 = shard_quality(model, full, tokens, Path(tmp), [permuted])
        print(f"{len(tokens)} positions; baseline (all experts, reversed): KL {kl0:.2e}, "
              f"agreement {agree0:.3f}")
        table(model, full, tokens, Path(tmp), ranking, spec)


def table(model: Path, full: np.ndarray, tokens: Sequence[int], tmp: Path,
          ranking: ExpertRanking, spec: MoeSpec) -> None:
    layout = moe_layout(read_header(model))
    assert layout is not None
    print(f"{'experts':>14} | {'top-k KL':>8} {'agree':>5} | {'rotations':>9} {'agree':>5} "
          f"{'ratio':>6} | {'planner: calibrated':>19} {'agree':>5} {'even':>7} {'agree':>5} "
          f"{'ratio':>6}")
    for share in (0.25, 0.5, 0.75):
        k = round(spec.n_expert * share)
        top = shard_quality(model, full, tokens, tmp, [calibrated_deal(ranking, k)])
        rot = shard_quality(model, full, tokens, tmp, even_deals(spec.n_expert, k, spec.n_layer))
        cal = shard_quality(model, full, tokens, tmp, planner_deals(layout, k, ranking))
        even = shard_quality(model, full, tokens, tmp, planner_deals(layout, k, None))
        print(f"{k:>4} of {spec.n_expert} ({share:.0%}) | {top[0]:8.3f} {top[1]:5.2f} | "
              f"{rot[0]:9.3f} {rot[1]:5.2f} {rot[0] / top[0]:6.1f} | {cal[0]:19.3f} "
              f"{cal[1]:5.2f} {even[0]:7.3f} {even[1]:5.2f} {even[0] / cal[0]:6.1f}", flush=True)


if __name__ == "__main__":
    main()
