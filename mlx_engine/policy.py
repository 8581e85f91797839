"""How wide each round of the fused loop verifies: fixed, or chosen online (the default).

Any width is exact (each round is verified on its own), so the choice only moves speed. A
round of width w costs c(w) seconds and commits E(w) = 1 + sum_{k<w} prod_{j<=k} p_j tokens,
p_j = P(draft j accepted | drafts before it accepted). Width 1 is a plain AR step: no draft,
E = 1. `AdaptiveWidth` picks argmax E(w) / c(w) before every round, so it verifies wide where
late drafts are accepted often enough to pay for their rows, narrow where they are not, and
falls back to AR steps when no width beats plain decoding (a drafter that does not know the
text, a device where a verify row is dear); drafting again needs a 10% expected edge.

c(w) starts from rounds timed during warm-up on this device (`Engine.calibrate`) and follows
the rounds' measured times; p_j is estimated per draft position from exponentially decayed
counts, and a new sequence starts from what earlier ones on the same engine saw (faded): the
acceptance the drafter has been getting is the best guess for a short answer's first rounds. A
new engine has seen nothing (each run of the `generate` CLI): its counts start at one try of
the first draft, half accepted, so that one failed opening round does not end drafting alone.
AR steps verify no drafts, so while it decodes plainly the loop drafts a block in the shadow
every `shadow_gap` steps: never verified, it is checked against the tokens AR then commits,
which tells exactly how many of its first drafts a verify would have accepted.
Acceptance is thus measured all along, at the cost of a drafter forward, not of a losing
verify round; a shadow that would have paid for its round sends the next round back to
drafting, so speculation resumes as soon as the text turns into one the drafter knows (a long
answer's opening often is not). The gap doubles while shadows would not have paid.

A new sequence's text may be one the drafter does not know, and the counts carried from earlier
sequences take several failed rounds to notice; on a CPU each costs half an AR step or more, a
large part of a short answer. So `FAILED_OPENING` drafted rounds that accept nothing before
the sequence's first accepted draft send it to AR steps whatever the counts say (a shadow that
would have paid, then a probe round that accepts a draft, end that). Later failures are left
to the sequence's own counts: the same rule there cost `code` 5-10% (scripts/policy_sim.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

DECAY = 0.9  # per round: acceptance follows the text as it changes
CARRY = 0.3  # what a new sequence keeps of the acceptance earlier ones saw
COST_EMA = 0.2  # weight of a new round time in the shared drift
LOCAL_EMA = 0.1  # ... and in its own width's correction (decisions rest on these ratios)
PRIOR = 1.0  # pseudo-tries behind each draft position's prior
# A new engine's counts: this many tries of the first draft, half accepted (they fade like any
# counts); with the prior alone, one failed opening round halved the first draft's estimate
# and sent the sequence to AR steps, whatever its next anchors held.
START_TRIES = 1.0
SPIKE = 3.0  # a round more than this times its estimate is other load, clipped
SHADOW_GAP, MAX_SHADOW_GAP = 4, 32  # AR steps between shadow drafts
SHADOW_HORIZON = 4  # drafts a shadow checks at most: enough to tell a round that would pay
# Leaving plain decoding (at a sequence's start too) needs this expected edge: an early block
# that fails costs a third to half an AR step on a CPU, a large part of a short answer.
ENTER = 1.1
FAILED_OPENING = 2  # failed rounds before a sequence's first accepted draft: unknown text


@runtime_checkable
class WidthPolicy(Protocol):
    """What the fused loop asks before every round and tells after it; during plain AR steps,
    whether to draft in the shadow, and what a shadow draft would have had accepted. A policy
    that never drafts in the shadow inherits `NeverShadows`."""

    max_width: int

    def next_width(self) -> int: ...

    def record(self, width: int, accepted: int, seconds: float) -> None: ...

    def shadow_due(self) -> bool: ...

    def observe_shadow(self, width: int, accepted: int) -> None: ...


class ShadowCheck:
    """A shadow draft's first drafts against the tokens plain AR steps commit after its anchor:
    once a draft differs, all are checked, or the steps end, how many of them a verify
    would have accepted, as `WidthPolicy.observe_shadow`'s (width, accepted)."""

    def __init__(self, read_drafts: Callable[[], list[int]]):
        """`read_drafts` is called at the first token seen, not before: drafted a step
        earlier, reading them then does not stall the device."""
        self.read_drafts = read_drafts
        self.drafts: list[int] | None = None
        self.seen = 0

    def see(self, token: int) -> tuple[int, int] | None:
        """The next committed token; (width, accepted) once the outcome is known."""
        if self.drafts is None:
            self.drafts = self.read_drafts()
        self.seen += 1
        if token != self.drafts[self.seen - 1]:
            return self.seen + 1, self.seen - 1
        return (self.seen + 1, self.seen) if self.seen == len(self.drafts) else None

    def end(self) -> tuple[int, int] | None:
        """The outcome so far when the AR steps end: every token seen matched."""
        return (self.seen + 1, self.seen) if self.seen else None


class NeverShadows:
    """For policies that take no shadow drafts: a fixed or a scripted width."""

    def shadow_due(self) -> bool:
        return False

    def observe_shadow(self, width: int, accepted: int) -> None:
        pass


@dataclass
class FixedWidth(NeverShadows):
    """Every round verifies `max_width` rows (the drafter's block size, or `--block-size N`)."""

    max_width: int

    def next_width(self) -> int:
        return self.max_width

    def record(self, width: int, accepted: int, seconds: float) -> None:
        pass


class RoundCosts:
    """Seconds per round at the widths measured on this device, scaled online by how much
    slower or faster rounds run now (a longer context, other load), with a per-width
    correction where a width was itself observed. The policy only picks measured widths:
    a BLAS's speed is not smooth in the row count (a row count off its blocking can cost more
    than a larger one)."""

    def __init__(self, measured: dict[int, float]):
        if 1 not in measured or len(measured) < 2:
            raise ValueError("round costs need width 1 (an AR step) and a drafting width")
        self.measured = dict(sorted(measured.items()))
        self.widths = list(self.measured)
        self.drift = 1.0
        self.local: dict[int, float] = {}

    def cost(self, width: int) -> float:
        return self.measured[width] * self.drift * self.local.get(width, 1.0)

    def measured_json(self) -> dict[str, float]:
        """The warm-up's seconds per round by width, for the evidence's params."""
        return {str(w): c for w, c in self.measured.items()}

    def in_ar_steps(self, width: int) -> float:
        """What a round of `width` costs in plain AR steps (the nearest measured width)."""
        near = min(self.widths, key=lambda w: abs(w - width))
        return self.cost(near) / self.cost(1)

    def observe(self, width: int, seconds: float) -> None:
        if width not in self.measured:
            return
        ratio = min(max(seconds / self.cost(width), 1 / SPIKE), SPIKE)
        self.drift *= ratio**COST_EMA
        self.local[width] = self.local.get(width, 1.0) * ratio**LOCAL_EMA

    @classmethod
    def from_rounds(cls, rounds: list[tuple[int, float]]) -> RoundCosts:
        """From timed (width, seconds) rounds: the median per width (the first of a shape
        may compile kernels; other load comes and goes)."""
        by_width: dict[int, list[float]] = {}
        for width, seconds in rounds:
            by_width.setdefault(width, []).append(seconds)
        return cls({w: statistics.median(t) for w, t in by_width.items()})


def calibration_widths(max_width: int) -> list[int]:
    """2, 4, 8, ... and max_width: the drafting widths timed at warm-up."""
    widths, w = {max_width}, 2
    while w < max_width:
        widths.add(w)
        w *= 2
    return sorted(widths)


class WidthScript(NeverShadows):
    """Plays a list of widths and keeps every round's time: the warm-up calibration run."""

    def __init__(self, widths: list[int]):
        self.plan, self.queue = list(widths), list(widths)
        self.max_width = max(widths)
        self.rounds: list[tuple[int, float]] = []

    @property
    def done(self) -> bool:
        return len(self.rounds) >= len(self.plan)

    def next_width(self) -> int:
        """Each call is one round's width (the loop asks once per round, maybe ahead)."""
        return self.queue.pop(0) if self.queue else self.max_width

    def record(self, width: int, accepted: int, seconds: float) -> None:
        self.rounds.append((width, seconds))


@dataclass
class Acceptance:
    """Decayed counts per draft position k (1-based) of rounds that verified it with drafts
    before it accepted (`tried`) and that accepted it too (`hit`).

    Each position's prior is one pseudo-try at the previous position's estimate (1/2 for the
    first): acceptance falls off smoothly along a block, so a position never verified yet is
    expected to do about as well as the last one that was. That is what lets the policy widen
    a block whose every draft is accepted, and narrow one whose first drafts already fail.
    """

    max_width: int
    tried: list[float] = field(init=False)
    hit: list[float] = field(init=False)
    observed: bool = field(init=False, default=False)  # a round (or shadow) was counted

    def __post_init__(self) -> None:
        self.tried = [0.0, START_TRIES] + [0.0] * (self.max_width - 2)
        self.hit = [0.0, START_TRIES / 2] + [0.0] * (self.max_width - 2)

    def probs(self) -> list[float]:
        """P(draft k accepted | drafts before it accepted) for k = 1..max_width-1."""
        out, prior = [], 0.5
        for k in range(1, self.max_width):
            prior = (self.hit[k] + PRIOR * prior) / (self.tried[k] + PRIOR)
            out.append(prior)
        return out

    def fade(self, factor: float) -> None:
        for k in range(1, self.max_width):
            self.tried[k] *= factor
            self.hit[k] *= factor

    def carry_over(self) -> None:
        """Fade what earlier sequences saw for a new one (a new engine's start counts stay)."""
        if self.observed:
            self.fade(CARRY)

    def observe(self, width: int, accepted: int) -> None:
        self.observed = True
        self.fade(DECAY)
        for k in range(1, min(accepted + 1, width - 1) + 1):
            self.tried[k] += 1
            self.hit[k] += accepted >= k

    def expected_tokens(self) -> list[float]:
        """E(w) for w = 1..max_width (index w - 1)."""
        out, survive = [1.0], 1.0
        for p in self.probs():
            survive *= p
            out.append(out[-1] + survive)
        return out


class AdaptiveWidth:
    """Per-round width with the most expected tokens per second (one sequence); the widths
    are those `costs` measured, up to `max_width`."""

    def __init__(self, costs: RoundCosts, max_width: int, acceptance: Acceptance | None = None):
        self.costs = costs
        self.candidates = [w for w in costs.widths if w <= max_width]
        self.max_width = self.candidates[-1]
        # what earlier sequences saw, faded: a prior for this one's first rounds
        self.acceptance = acceptance or Acceptance(self.max_width)
        self.acceptance.carry_over()
        self.drafting = False  # the last decision drafted (else: plain AR steps)
        self.shadow_gap = SHADOW_GAP
        self.since_shadow = 0  # AR steps since the last shadow draft
        self.probe_due = False  # a shadow would have paid: the next round drafts
        self.opening_failures: int | None = 0  # None once a draft was accepted

    def rates(self) -> dict[int, float]:
        """Expected committed tokens per second of a round, by width."""
        expected = self.acceptance.expected_tokens()
        return {w: expected[w - 1] / self.costs.cost(w) for w in self.candidates}

    def next_width(self) -> int:
        rates = self.rates()
        best = max(self.candidates[1:], key=rates.__getitem__)
        probe, self.probe_due = self.probe_due, False
        pays = rates[best] > rates[1] * (1.0 if self.drafting else ENTER)
        opening_failed = (self.opening_failures is not None
                          and self.opening_failures >= FAILED_OPENING)
        self.drafting = pays and not opening_failed
        return best if self.drafting or probe else 1

    def record(self, width: int, accepted: int, seconds: float) -> None:
        if math.isfinite(seconds) and seconds > 0:
            self.costs.observe(width, seconds)
        if width > 1:
            self.acceptance.observe(width, accepted)
            if self.opening_failures is not None:
                self.opening_failures = None if accepted else self.opening_failures + 1

    def shadow_due(self) -> bool:
        """Asked once per AR step while no shadow draft is pending."""
        if self.probe_due:  # the next round drafts anyway
            return False
        self.since_shadow += 1
        if self.since_shadow < self.shadow_gap:
            return False
        self.since_shadow = 0
        return True

    def observe_shadow(self, width: int, accepted: int) -> None:
        """A shadow draft of which the first `width - 1` were checked, `accepted` matched. If
        a round verifying it would have beaten plain decoding, the next round drafts: the
        decayed counts alone may still remember the text the drafter did not know."""
        self.acceptance.observe(width, accepted)
        paid = max((min(accepted, w - 1) + 1) / self.costs.cost(w) for w in self.candidates[1:])
        self.probe_due = paid > 1 / self.costs.cost(1)
        self.shadow_gap = (SHADOW_GAP if self.probe_due
                           else min(2 * self.shadow_gap, MAX_SHADOW_GAP))
