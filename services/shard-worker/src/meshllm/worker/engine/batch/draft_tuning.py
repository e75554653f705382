"""How many tokens to draft per step, from the link's round trip, the step's compute and the
acceptance seen so far: longer drafts when each step waits longer on the network, shorter
when each row of a batch costs nearly a pass of its own.

The model: a step that verifies k drafted tokens of each of n sequences costs
    T(k) = rtt + pass + n * (1 + k) * row
(rtt: the round trips to the stages, paid once per ubatch whatever its size; pass: what a
ubatch costs besides its rows; row: each row of the batch) and emits per sequence
    E(k) = 1 + a + a^2 + ... + a^k
tokens on average when each drafted token is accepted with probability a, given the ones
before it were. The best k maximises E(k) / T(k). pass and row are fitted to the steps'
wall times (CostFit), since they differ by kernel and device: with the batch-invariant
kernels on this machine's CPU a row of gemma3-270m costs about three quarters of a
one-token step (a step is mostly rows), so on loopback a draft pays only when nearly every
token is kept, while on a slow link the round trip makes even a fair drafter worth it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROW_SHARE = 1 / 6  # a row's share of a one-token step, until the steps seen tell (CostFit)
FORGET = 0.05  # weight of the latest step in the fit of a step's compute
NOMINAL_STEP_S = 0.02  # a one-token step assumed until one is timed (a small model on a CPU)
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
class CostFit:
    """A step's compute fitted as passes * pass_s + rows * row_s by least squares over the
    steps seen, each older one weighing 1 - FORGET times less. Steps of one shape (always
    one pass of eight rows) cannot tell a pass from a row: then `split` is None."""

    pp: float = 0.0
    pr: float = 0.0
    rr: float = 0.0
    py: float = 0.0
    ry: float = 0.0

    def add(self, passes: int, rows: int, compute_s: float) -> None:
        keep = 1.0 - FORGET
        self.pp = keep * self.pp + passes * passes
        self.pr = keep * self.pr + passes * rows
        self.rr = keep * self.rr + rows * rows
        self.py = keep * self.py + passes * compute_s
        self.ry = keep * self.ry + rows * compute_s

    def split(self) -> tuple[float, float] | None:
        """(pass_s, row_s) when the steps seen differ enough in shape to tell them apart.
        Neither is negative: where the fit says so (on a CPU a step is all rows, and two
        rows can cost more than twice one), that one is 0 and the other is fitted alone."""
        det = self.pp * self.rr - self.pr * self.pr
        if det <= 0.02 * self.pp * self.rr:  # shapes too alike: the fit would be noise
            return None
        pass_s = (self.rr * self.py - self.pr * self.ry) / det
        row_s = (self.pp * self.ry - self.pr * self.py) / det
        if pass_s < 0:
            return 0.0, max(self.ry / self.rr, 0.0)
        if row_s < 0:
            return max(self.py / self.pp, 0.0), 0.0
        return pass_s, row_s


@dataclass
class DraftTuner:
    """Running estimates of a step's compute and the acceptance, and the draft length they
    call for, up to `k_max`. When that is 0 and `probing`, one step in PROBE_EVERY drafts
    one token all the same, so that the acceptance keeps being measured (it changes with
    the text); a drafter that costs nothing to ask is measured without drafting instead
    (step.py's shadow drafts), so it does not probe."""

    rtt_s: float  # the round trips of one ubatch to the stages (0: the model is whole)
    k_max: int
    step_s: float = 0.0  # compute of a one-token, one-sequence step; 0: not measured yet
    acceptance: float = PRIOR_ACCEPTANCE
    probing: bool = True
    fit: CostFit = field(default_factory=CostFit)
    _asked: int = field(default=0, init=False, repr=False)

    @property
    def row_s(self) -> float:
        split = self.fit.split()
        return split[1] if split else ROW_SHARE * (self.step_s or NOMINAL_STEP_S)

    @property
    def pass_s(self) -> float:
        """What a ubatch costs besides its rows and round trips."""
        split = self.fit.split()
        return split[0] if split else (1 - ROW_SHARE) * (self.step_s or NOMINAL_STEP_S)

    def observe(self, wall_s: float, rows: int, accepted: int, rejected: int,
                passes: int = 1) -> None:
        """One decode step: its wall time, rows and ubatches (each a pass over the weights
        and the round trips), the drafted tokens it kept and the drafts it cut short (each
        ended at one rejected token)."""
        passes, rows = max(passes, 1), max(rows, 1)
        compute = max(wall_s - passes * self.rtt_s, 1e-6)
        if wall_s > passes * self.rtt_s:  # else the link was faster than told: no measure
            self.fit.add(passes, rows, compute)
        split = self.fit.split()
        # Without a fit, compute = passes * p + rows * r with r = ROW_SHARE * (p + r).
        one = (sum(split) if split else
               compute / (passes * (1 - ROW_SHARE) + rows * ROW_SHARE))
        self.step_s = one if self.step_s == 0.0 or split else _blend(self.step_s, one)
        self.observe_acceptance(accepted, rejected)

    def observe_acceptance(self, accepted: int, rejected: int) -> None:
        if accepted + rejected:
            # Each kept token is a success, each cut a failure, of a draw with chance a.
            self.acceptance = _blend(self.acceptance, accepted / (accepted + rejected))

    def length(self, seqs: int) -> int:
        if self.step_s == 0.0:
            return self.k_max if self.rtt_s > 0 else min(self.k_max, 2)
        best = draft_length(self.rtt_s, self.step_s, self.acceptance, seqs=seqs,
                            k_max=self.k_max, row_share=self.row_s / self.step_s)
        self._asked += 1
        if best or not self.probing:
            return best
        return 0 if self._asked % PROBE_EVERY else min(1, self.k_max)


def _blend(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
