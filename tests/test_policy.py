"""The width policy's decisions on synthetic costs and acceptance (no model needed)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from mlx_engine.policy import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    AdaptiveWidth,
    RoundCosts,
    WidthScript,
    calibration_widths,
)

CPU_LIKE = {1: 1.0, 2: 1.2, 4: 1.3, 8: 1.5, 16: 1.8}  # a verify row costs a little
GPU_LIKE = {1: 1.0, 2: 1.3, 4: 1.3, 8: 1.35, 16: 1.45}  # ... hardly anything


class FrozenCosts(RoundCosts):
    def observe(self, width: int, seconds: float) -> None:
        pass


def _run(costs: dict[int, float], accepted, rounds: int = 60) -> list[tuple[int, int]]:
    """Drive a policy for `rounds` rounds; `accepted(width)` is each block's outcome."""
    policy = AdaptiveWidth(FrozenCosts(costs), 16)
    out = []
    for _ in range(rounds):
        width = policy.next_width()
        got = 0 if width == 1 else accepted(width)
        policy.record(width, got, 1.0)
        out.append((width, got))
    return out


@pytest.mark.parametrize("costs", [CPU_LIKE, GPU_LIKE])
def test_a_drafter_always_right_gets_the_full_width(costs):
    assert [w for w, _ in _run(costs, lambda w: w - 1)][2:] == [16] * 58


@pytest.mark.parametrize("costs", [CPU_LIKE, GPU_LIKE])
def test_a_drafter_always_wrong_falls_back_to_ar_with_ever_rarer_probes(costs):
    widths = [w for w, _ in _run(costs, lambda w: 0, rounds=200)]
    probes = [i for i, w in enumerate(widths) if w > 1]
    assert len(probes) <= 8 and widths[-60:].count(1) >= 58
    gaps = [b - a - 1 for a, b in pairwise(probes)]
    assert gaps[-1] >= 2 * FIRST_BACKOFF and gaps == sorted(gaps)
    assert max(gaps) <= MAX_BACKOFF


def test_one_accepted_draft_keeps_narrow_blocks_not_ar():
    widths = [w for w, _ in _run(CPU_LIKE, lambda w: min(1, w - 1))]
    assert 1 not in widths and set(widths[5:]) <= {2, 4}


def test_a_probe_that_wins_brings_speculation_back():
    text_known = [False]
    history = _run(CPU_LIKE, lambda w: w - 1 if text_known[0] else 0, rounds=30)
    assert history[-1][0] == 1  # fell back while the drafts were wrong
    text_known[0] = True
    policy = AdaptiveWidth(FrozenCosts(CPU_LIKE), 16)
    for width, got in history:  # replay the wrong phase into a fresh policy ...
        policy.next_width()
        policy.record(width, got, 1.0)
    widths = []
    for _ in range(60):  # ... then the drafts turn right
        width = policy.next_width()
        policy.record(width, 0 if width == 1 else width - 1, 1.0)
        widths.append(width)
    assert widths[-1] == 16 and widths.index(16) < 40


def test_round_costs_median_spikes_and_drift():
    costs = RoundCosts.from_rounds([(1, 1.0), (1, 9.0), (1, 1.2), (4, 1.3), (4, 1.5), (4, 1.4)])
    assert costs.measured == {1: 1.2, 4: 1.4}
    assert costs.in_ar_steps(4) == pytest.approx(1.4 / 1.2)
    costs.observe(1, 1000.0)  # one round under other load: clipped, and it moves all widths
    assert costs.cost(1) < 1.2 * 3
    assert costs.in_ar_steps(4) == pytest.approx(1.4 / 1.2, rel=0.2)
    for _ in range(50):  # a context that keeps growing: every round slower
        costs.observe(1, 2.4)
        costs.observe(4, 2.8)
    assert costs.cost(1) == pytest.approx(2.4, rel=0.05)
    assert costs.in_ar_steps(4) == pytest.approx(2.8 / 2.4, rel=0.05)
    with pytest.raises(ValueError):
        RoundCosts({4: 1.0})


def test_calibration_plan():
    assert calibration_widths(16) == [2, 4, 8, 16]
    assert calibration_widths(6) == [2, 4, 6]
    script = WidthScript([1, 4, 4])
    assert [script.next_width() for _ in range(4)] == [1, 4, 4, 4]
    for w in (1, 4, 4):
        script.record(w, 0, 0.5)
    assert script.done
