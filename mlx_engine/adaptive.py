"""`--block-size auto`: pick each block's verified width from measured cost and acceptance.

Any width 2..B is exact (each block is verified on its own), so the choice only moves speed.
A block of width w costs c(w) seconds (draft w-1 positions + verify w rows) and commits
E(w) = 1 + sum_{k<w} P(drafts 1..k all accepted) tokens; the policy picks argmax E(w) / c(w).
That is mlx-dspark's rule — acceptance per unit of verify width is what matters — made
quantitative: where verify cost grows with width (a CPU, a small GPU), a short block wins
unless late drafts are accepted often enough to pay for their rows.

c(w) is measured once per run on a real prompt's cache (`calibrate`: one fused run that
cycles through the widths REPEATS times). P is estimated per draft position from the blocks
that verified it, with exponentially decayed counts so it follows the running acceptance;
every PROBE_EVERY-th block verifies the full width so positions past the current choice keep
being measured.
"""

from __future__ import annotations

from .engine import Engine, RunOptions
from .speculative import DecodeStats

PROBE_EVERY = 8
DECAY = 0.95
REPEATS = 3


class WidthCycle:
    """Calibration policy: every width in turn, REPEATS times. A block's cost is read from
    the loop's cumulative draft + verify time when the next block asks for its width."""

    def __init__(self, widths: list[int], repeats: int = REPEATS):
        self.plan = [w for _ in range(repeats) for w in widths]
        self.times: dict[int, list[float]] = {w: [] for w in widths}
        self._last: tuple[int, float] | None = None

    @property
    def done(self) -> bool:
        return sum(map(len, self.times.values())) >= len(self.plan)

    def __call__(self, stats: DecodeStats) -> int:
        spent = stats.draft_s + stats.verify_s
        if self._last is not None:
            width, before = self._last
            self.times[width].append(spent - before)
        width = self.plan[min(sum(map(len, self.times.values())), len(self.plan) - 1)]
        self._last = (width, spent)
        return width

    def cost(self) -> dict[int, float]:
        """Fastest observed block per width (the least disturbed by other load), capped by
        every wider width's: a block is never dearer than a wider one, so a cost above that
        is a load spike."""
        cost, cheapest = {}, float("inf")
        for w in sorted(self.times, reverse=True):
            cheapest = cost[w] = min(cheapest, *self.times[w])
        return dict(sorted(cost.items()))


def calibrate(engine: Engine, prompt: list[int], max_width: int) -> dict[int, float]:
    """Seconds per block at each width 2..max_width, on `prompt`'s cache (after warm-up)."""
    cycle = WidthCycle(list(range(2, max_width + 1)))
    opts = RunOptions(max_tokens=sum(cycle.plan) + 2 * max_width, ignore_eos=True,
                      block_size=cycle)
    for _ in engine.stream("fused", prompt, opts, DecodeStats()):
        if cycle.done:
            break
    return cycle.cost()


class AdaptiveWidth:
    """Per-block policy: the width with the most expected committed tokens per second."""

    def __init__(self, cost: dict[int, float], probe_every: int = PROBE_EVERY,
                 decay: float = DECAY):
        self.cost, self.probe_every, self.decay = cost, probe_every, decay
        self.max_width = max(cost)
        # per draft position k (1-based): decayed counts of blocks that verified it with
        # drafts 1..k-1 accepted (tried), and of those that accepted it too (hit)
        self.tried = [0.0] * self.max_width
        self.hit = [0.0] * self.max_width
        self.chosen: list[int] = []  # every block's width, for the evidence
        self._stats: DecodeStats | None = None
        self._seen = 0

    def accept_prob(self, k: int) -> float:
        """P(draft k accepted | drafts before it accepted), Laplace-smoothed."""
        return (self.hit[k] + 1) / (self.tried[k] + 2)

    def observe(self, width: int, accepted: int) -> None:
        for k in range(1, min(accepted + 1, width - 1) + 1):
            self.tried[k] = self.tried[k] * self.decay + 1
            self.hit[k] = self.hit[k] * self.decay + (accepted >= k)

    def best(self) -> int:
        expected, survive = 1.0, 1.0
        rates = {}
        for w in range(2, self.max_width + 1):
            survive *= self.accept_prob(w - 1)
            expected += survive
            rates[w] = expected / self.cost[w]
        return max(rates, key=rates.__getitem__)

    def __call__(self, stats: DecodeStats) -> int:
        if stats is not self._stats:  # a new run: its first block has no outcome yet
            self._stats, self._seen = stats, 0
        for accepted in stats.accepted[self._seen :]:
            self.observe(self.chosen[-1], accepted)
        self._seen = len(stats.accepted)
        probe = len(self.chosen) % self.probe_every == 0
        width = self.max_width if probe else self.best()
        self.chosen.append(width)
        return width
