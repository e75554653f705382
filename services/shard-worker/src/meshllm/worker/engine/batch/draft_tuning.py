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
PRIOR_WEIGHT = 2.0  # the prior weighs as much as two drafted tokens
BLIND_ACCEPTANCE = 0.5  # at most, for a request whose own drafts told nothing yet
EVIDENCE_CAP = 16.0  # kept tokens and cuts a request remembers, the older scaled away
SMOOTHING = 0.2  # weight of the latest step in the running estimate of a step's compute
PROBE_EVERY = 8  # while drafting does not pay, every 8th step still drafts one token


def draft_length(rtt_s: float, step_s: float, acceptance: float, *, seqs: int = 1,
                 k_max: int = 8, row_share: float = ROW_SHARE,
                 plain_s: float | None = None) -> int:
    """The draft length in 0..k_max with the most tokens per second (ties: the shorter).
    `plain_s`: the compute of the step without drafts, when it was timed apart (one row
    alone takes a faster path than several on a CPU: 18.8 ms, where two take 47)."""
    a = min(max(acceptance, 0.0), 1.0)
    row = row_share * max(step_s, 1e-6)
    best, best_rate = 0, 0.0
    for k in range(k_max + 1):
        emitted = expected_tokens(k, a)
        cost = max(rtt_s, 0.0) + max(step_s, 1e-6) + (max(seqs, 1) * (1 + k) - 1) * row
        if k == 0 and plain_s:
            cost = max(rtt_s, 0.0) + plain_s
        rate = emitted / cost
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = k, rate
    return best


def expected_tokens(drafted: int, acceptance: float) -> float:
    """Tokens a sequence emits from one verification of `drafted` tokens, E(k) above: the
    target's own one, plus each drafted token kept while all before it were."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(drafted + 1) if a >= 1.0 else (1.0 - a ** (drafted + 1)) / (1.0 - a)


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
    # A row's share of a one-row step, as last told apart (ROW_SHARE before): what the
    # tuner assumes while the steps are all of one shape again (no drafts for a while),
    # rather than fall back to a guess that may call for drafts that did not pay.
    row_share: float = ROW_SHARE

    def add(self, passes: int, rows: int, compute_s: float) -> None:
        keep = 1.0 - FORGET
        self.pp = keep * self.pp + passes * passes
        self.pr = keep * self.pr + passes * rows
        self.rr = keep * self.rr + rows * rows
        self.py = keep * self.py + passes * compute_s
        self.ry = keep * self.ry + rows * compute_s
        split = self.split()
        if split and sum(split) > 0:
            self.row_share = split[1] / sum(split)

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
    """Running estimates of what a step's pass and rows cost, and the draft length they
    call for at a given acceptance, up to `k_max`. When that is 0 and `probing`, one ask
    in PROBE_EVERY gets one token all the same, so that the acceptance keeps being
    measured (it changes with the text); a drafter that costs nothing to ask is measured
    without drafting instead (step.py's shadow drafts), so it does not probe."""

    rtt_s: float  # the round trips of one ubatch to the stages (0: the model is whole)
    k_max: int
    step_s: float = 0.0  # compute of a one-token, one-sequence step; 0: not measured yet
    single_s: float = 0.0  # compute of a one-row step as timed (0: none yet)
    probing: bool = True
    fit: CostFit = field(default_factory=CostFit)
    _asked: int = field(default=0, init=False, repr=False)

    @property
    def row_s(self) -> float:
        split = self.fit.split()
        return split[1] if split else self.fit.row_share * (self.step_s or NOMINAL_STEP_S)

    @property
    def pass_s(self) -> float:
        """What a ubatch costs besides its rows and round trips."""
        split = self.fit.split()
        share = self.fit.row_share
        return split[0] if split else (1 - share) * (self.step_s or NOMINAL_STEP_S)

    def observe(self, wall_s: float, rows: int, passes: int = 1) -> None:
        """One decode step: its wall time, rows and ubatches (each a pass over the weights
        and the round trips)."""
        passes, rows = max(passes, 1), max(rows, 1)
        compute = max(wall_s - passes * self.rtt_s, 1e-6)
        if wall_s <= passes * self.rtt_s:  # the link was faster than told: no measure
            return
        if rows == 1:  # a path of its own on a CPU: timed apart, kept out of the fit
            self.single_s = compute if not self.single_s else _blend(self.single_s, compute)
            if self.step_s and self.fit.split():
                return
        else:
            self.fit.add(passes, rows, compute)
        split, share = self.fit.split(), self.fit.row_share
        # Without a fit, compute = passes * p + rows * r with r = share * (p + r).
        one = sum(split) if split else compute / (passes * (1 - share) + rows * share)
        self.step_s = one if self.step_s == 0.0 or split else _blend(self.step_s, one)

    def length(self, seqs: int, acceptance: float) -> int:
        """The draft length for one of `seqs` sequences whose drafts are kept at
        `acceptance`, as if the others drafted as much."""
        if self.step_s == 0.0:
            return self.k_max if self.rtt_s > 0 else min(self.k_max, 2)
        best = draft_length(self.rtt_s, self.step_s, acceptance, seqs=seqs,
                            k_max=self.k_max, row_share=min(self.row_s / self.step_s, 1.0),
                            plain_s=self.single_s if seqs == 1 else None)
        self._asked += 1
        if best or not self.probing:
            return best
        return 0 if self._asked % PROBE_EVERY else min(1, self.k_max)


@dataclass
class Acceptance:
    """One request's estimate of the chance that a drafted token is kept, given the ones
    before it were: each kept token a success, each cut draft a failure, with the prior
    counted as PRIOR_WEIGHT tokens' worth of evidence, and at most EVIDENCE_CAP of it
    remembered (text that repeated may stop). One fully kept draft of 8 tokens says 0.9;
    one cut at its first token 0.33."""

    prior: float = PRIOR_ACCEPTANCE  # the engine's recent acceptance, at admission
    kept: float = 0.0
    cut: float = 0.0

    @property
    def value(self) -> float:
        return ((self.kept + PRIOR_WEIGHT * self.prior)
                / (self.kept + self.cut + PRIOR_WEIGHT))

    @property
    def seen(self) -> bool:
        """Whether this request's own drafts (or shadows) have told anything yet."""
        return self.kept + self.cut > 0

    def update(self, kept: int, cut: int | bool) -> None:
        """A verification (or a shadow draft's score) that kept `kept` drafted tokens and
        was cut short `cut` times (0 or 1); nothing drafted teaches nothing."""
        self.kept += kept
        self.cut += int(cut)
        total = self.kept + self.cut
        if total > EVIDENCE_CAP:
            self.kept *= EVIDENCE_CAP / total
            self.cut *= EVIDENCE_CAP / total


def recent_acceptance(recent: float, kept: int, cut: int | bool) -> float:
    """The engine-wide running acceptance, over every request's verifications: the prior
    of the next request admitted (a mesh serving an agent's loop sees the same kind of
    text again and again)."""
    return _blend(recent, kept / (kept + cut)) if kept + cut else recent


def _blend(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
