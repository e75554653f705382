"""How many tokens to draft per step, from the link's round trip, the step's compute and the
acceptance seen so far: longer drafts when each step waits longer on the network.

The model: a step that verifies k drafted tokens of each of n sequences costs
    T(k) = rtt + step + (n * (1 + k) - 1) * row
(rtt: the round trips to the stages, paid once per step whatever its size; step: the
compute of a one-token step; row: each further row of the batch) and emits per sequence
    E(k) = 1 + a + a^2 + ... + a^k
tokens on average when each drafted token is accepted with probability a, given the ones
before it were. The best k maximises E(k) / T(k). On this machine's CPU a row costs about a
sixth of a one-token step of gemma3-270m (bench/split_profile.py: 23 ms for one sequence,
49 ms for eight), so on loopback drafts of 1-3 pay and at 50 ms a round trip 6-8 do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROW_SHARE = 1 / 6  # one more row in a step, as a share of a one-token step's compute
PRIOR_ACCEPTANCE = 0.5  # before anything was drafted
SMOOTHING = 0.2  # weight of the latest step in the running estimates
PROBE_EVERY = 8  # while drafting does not pay, every 8th step still drafts one token


def draft_length(rtt_s: float, step_s: float, acceptance: float, *, seqs: int = 1,
                 k_max: int = 8, row_share: float = ROW_SHARE) -> int:
    """The draft length in 0..k_max with the most tokens per second (ties: the shorter)."""
    a = min(max(acceptance, 0.0), 1.0)
    row = row_share * max(step_s, 1e-6)
    best, best_rate = 0, 0.0
    for k in range(k_max + 1):
        emitted = float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
        cost = max(rtt_s, 0.0) + max(step_s, 1e-6) + (max(seqs, 1) * (1 + k) - 1) * row
        rate = emitted / cost
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best


def usable_rtt_s(rtt_s: float) -> float:
    """A round trip the tuner can use: what is not a finite, non-negative number of
    seconds (a link not measured, a bad message) counts as no wait."""
    return rtt_s if math.isfinite(rtt_s) and rtt_s > 0 else 0.0


@dataclass
class DraftTuner:
    """Running estimates of a step's compute and the acceptance, and the draft length they
    call for, up to `k_max`. When that is 0, one step in PROBE_EVERY drafts one token all
    the same, so that the acceptance keeps being measured (it changes with the text)."""

    rtt_s: float  # the round trips of one step to the stages (0: the model is whole)
    k_max: int
    step_s: float = 0.0  # compute of a one-token, one-sequence step; 0: not measured yet
    acceptance: float = PRIOR_ACCEPTANCE
    _asked: int = field(default=0, init=False, repr=False)

    def observe(self, wall_s: float, rows: int, accepted: int, rejected: int) -> None:
        """One decode step: its wall time and rows, the drafted tokens it kept and the
        drafts it cut short (each ended at one rejected token)."""
        compute = max(wall_s - self.rtt_s, 1e-6)
        # compute = p + rows * r with p + r = step and r = ROW_SHARE * step
        one = compute / (1 + (max(rows, 1) - 1) * ROW_SHARE)
        self.step_s = one if self.step_s == 0.0 else _blend(self.step_s, one)
        if accepted + rejected:
            # Each kept token is a success, each cut a failure, of a draw with chance a.
            self.acceptance = _blend(self.acceptance, accepted / (accepted + rejected))

    def length(self, seqs: int) -> int:
        if self.step_s == 0.0:
            return self.k_max if self.rtt_s > 0 else min(self.k_max, 2)
        best = draft_length(self.rtt_s, self.step_s, self.acceptance, seqs=seqs,
                            k_max=self.k_max)
        self._asked += 1
        return best if best or self._asked % PROBE_EVERY else min(1, self.k_max)


def _blend(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
