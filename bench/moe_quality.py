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
  planner     the planner's own deal (planner.experts.deal at the default hot share) over
              the fewest shards, three or more, that can hold every expert twice (the
              coverage rule: 3 shards of 4 of 8 cannot, and plan_shards refuses them), with
              the ranking (calibrated) and without it (even), averaged over its shards

The baseline, measured in the same run, is the full model against a shard holding every
expert in another order (KL 0 and agreement 1 when the surgery is exact); the ratios printed
are rotations KL / top-k KL and the planner's even KL / calibrated KL. A second table deals
shard sets the planner accepts (2 to 6 shards) at each hot share of --hot-shares, printing
the mean and the worst shard's KL and the mean agreement: the hot share is capped by the
coverage rule, so past that cap it changes nothing. Shards with the same experts are
evaluated once. Also: calibration time against a plain evaluation of the same tokens (the
eval callback's overhead).

    .venv/bin/python bench/moe_quality.py [--skew 1.0] [--tokens 160] [--dir /tmp/moe-bench]
        [--hot-shares 0,0.25,0.5,0.75,1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshllm.common.gguf import read_header  # noqa: E402
from meshllm.common.moe import ExpertRanking, MoeLayout, moe_layout  # noqa: E402
from meshllm.planner.experts import (  # noqa: E402
    DEFAULT_HOT_SHARE,
    copies_wanted,
    deal,
    hot_count,
)
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
# (experts per shard, shards) the coverage rule accepts with 8 experts: tight ones (2 of 4,
# 4 of 4: no room for a hot set) and looser ones
SWEEP = ((4, 2), (4, 4), (4, 6), (6, 2), (6, 3), (6, 4))
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


@dataclass(frozen=True)
class Judge:
    """Cuts and scores shards against the full model's logits, each selection once."""

    model: Path
    full: np.ndarray
    tokens: Sequence[int]
    tmp: Path
    seen: dict[Selection, tuple[float, float]] = field(default_factory=dict)

    def one(self, selection: Selection) -> tuple[float, float]:
        key = tuple(tuple(sorted(layer)) for layer in selection)
        if key not in self.seen:
            path = self.tmp / "shard.gguf"
            write_shard(self.model, path, key)
            self.seen[key] = compare(self.full, path, self.tokens)
            path.unlink()
        return self.seen[key]

    def shards(self, deals: Sequence[Selection]) -> tuple[float, float, float]:
        """(mean KL, worst shard's KL, mean agreement) over `deals`."""
        results = [self.one(selection) for selection in deals]
        return (statistics.mean(r[0] for r in results), max(r[0] for r in results),
                statistics.mean(r[1] for r in results))


def even_deals(n_expert: int, k: int, layers: int) -> list[Selection]:
    """Every rotation of k experts spread evenly over n_expert, the same in every layer."""
    base = [round(i * n_expert / k) for i in range(k)]
    deals = {tuple(sorted((b + r) % n_expert for b in base)) for r in range(n_expert)}
    return [tuple(d for _ in range(layers)) for d in sorted(deals)]


def calibrated_deal(ranking: ExpertRanking, k: int) -> Selection:
    return tuple(tuple(sorted(ranking.layer_order(layer)[:k]))
                 for layer in range(len(ranking.counts)))


def fewest_shards(expert_count: int, k: int) -> int:
    """The fewest shards, three or more, of k experts each that hold every expert as often
    as the planner wants."""
    n = 3
    while n * k < copies_wanted(n) * expert_count:
        n += 1
    return n


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
    parser.add_argument("--hot-shares", default="0,0.25,0.5,0.75,1",
                        help="comma-separated hot shares for the planner's sweep")
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
    layout = moe_layout(read_header(model))
    assert layout is not None
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        judge = Judge(model, full, tokens, Path(tmp))
        permuted = tuple(tuple(reversed(range(spec.n_expert))) for _ in range(spec.n_layer))
        kl0, _, agree0 = judge.shards([permuted])
        print(f"{len(tokens)} positions; baseline (all experts, reversed): KL {kl0:.2e}, "
              f"agreement {agree0:.3f}")
        table(judge, layout, ranking)
        sweep(judge, layout, ranking, [float(s) for s in args.hot_shares.split(",")])


def table(judge: Judge, layout: MoeLayout, ranking: ExpertRanking) -> None:
    n_expert = layout.expert_count
    print(f"{'experts':>14} | {'top-k KL':>8} {'agree':>5} | {'rotations':>9} {'agree':>5} "
          f"{'ratio':>6} | {'planner: shards':>15} {'calibrated':>10} {'agree':>5} "
          f"{'even':>7} {'agree':>5} {'ratio':>6}")
    for share in (0.25, 0.5, 0.75):
        k = round(n_expert * share)
        n = fewest_shards(n_expert, k)
        top = judge.shards([calibrated_deal(ranking, k)])
        rot = judge.shards(even_deals(n_expert, k, layout.moe_layers))
        cal = judge.shards(deal(layout, [k] * n, ranking, DEFAULT_HOT_SHARE))
        even = judge.shards(deal(layout, [k] * n, None, DEFAULT_HOT_SHARE))
        print(f"{k:>4} of {n_expert} ({share:.0%}) | {top[0]:8.3f} {top[2]:5.2f} | "
              f"{rot[0]:9.3f} {rot[2]:5.2f} {rot[0] / top[0]:6.1f} | {n:>15} {cal[0]:10.3f} "
              f"{cal[2]:5.2f} {even[0]:7.3f} {even[2]:5.2f} {even[0] / cal[0]:6.1f}",
              flush=True)


def sweep(judge: Judge, layout: MoeLayout, ranking: ExpertRanking,
          hot_shares: Sequence[float]) -> None:
    """The planner's calibrated deal per hot share: mean KL / worst shard's KL, agreement;
    `hot` is the hot experts the coverage rule leaves room for at that share."""
    print(f"planner's deal per hot share (mean KL / worst shard KL, mean agreement; default "
          f"{DEFAULT_HOT_SHARE:g}); top-k and even deal beside it")
    print(f"{'shards':>12} | {'top-k':>5} | " + " | ".join(
        f"{'hot share ' + format(h, 'g'):>22}" for h in hot_shares) + f" | {'even':>17}")
    for k, n in SWEEP:
        top = judge.shards([calibrated_deal(ranking, k)])
        cells = []
        for share in hot_shares:
            hot = hot_count([k] * n, share, True, layout.expert_count)
            kl, worst, agree = judge.shards(deal(layout, [k] * n, ranking, share))
            cells.append(f"hot {hot} {kl:5.2f}/{worst:5.2f} {agree:4.2f}")
        kl, worst, agree = judge.shards(deal(layout, [k] * n, None, 0.0))
        print(f"{n} x {k} of {layout.expert_count} | {top[0]:5.2f} | " + " | ".join(cells)
              + f" | {kl:5.2f}/{worst:5.2f} {agree:4.2f}", flush=True)


if __name__ == "__main__":
    main()
