"""The width policy's decisions on synthetic costs and acceptance (no model needed)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from mlx_engine.policy import (
    FAILED_OPENING,
    MAX_SHADOW_GAP,
    SHADOW_GAP,
    SHADOW_HORIZON,
    AdaptiveWidth,
    RoundCosts,
    ShadowCheck,
    WidthScript,
    calibration_widths,
)

CPU_LIKE = {1: 1.0, 2: 1.2, 4: 1.3, 8: 1.5, 16: 1.8}  # a verify row costs a little
GPU_LIKE = {1: 1.0, 2: 1.3, 4: 1.3, 8: 1.35, 16: 1.45}  # ... hardly anything
CPU_2_CORES = {1: 1.0, 2: 1.42, 4: 1.48, 8: 1.37, 16: 1.76}  # warm-ups of the README command


class FrozenCosts(RoundCosts):
    def observe(self, width: int, seconds: float) -> None:
        pass


def _drive(policy: AdaptiveWidth, accepted, rounds: int) -> tuple[list[tuple[int, int]],
                                                                     list[int]]:
    """`rounds` rounds; `accepted(width)` is a block's outcome, also a shadow draft's (checked
    up to its first wrong draft). Returns (width, accepted) per round and the rounds at which
    a shadow was drafted."""
    out, shadows = [], []
    for i in range(rounds):
        width = policy.next_width()
        got = 0 if width == 1 else accepted(width)
        policy.record(width, got, 1.0)
        if width == 1 and policy.shadow_due():  # checked up to a miss or the horizon
            matched = accepted(policy.max_width)
            seen = min(matched + 1, SHADOW_HORIZON)
            policy.observe_shadow(seen + 1, min(matched, seen))
            shadows.append(i)
        out.append((width, got))
    return out, shadows


def _run(costs: dict[int, float], accepted, rounds: int = 60) -> list[tuple[int, int]]:
    return _drive(AdaptiveWidth(FrozenCosts(costs), 16), accepted, rounds)[0]


@pytest.mark.parametrize("costs", [CPU_LIKE, GPU_LIKE])
def test_a_drafter_always_right_gets_the_full_width(costs):
    assert [w for w, _ in _run(costs, lambda w: w - 1)][2:] == [16] * 58


@pytest.mark.parametrize("costs", [CPU_LIKE, GPU_LIKE])
def test_a_drafter_always_wrong_falls_back_to_ar_with_ever_rarer_shadow_drafts(costs):
    rounds, shadows = _drive(AdaptiveWidth(FrozenCosts(costs), 16), lambda w: 0, 200)
    widths = [w for w, _ in rounds]
    assert widths.count(1) >= 195, "no verify round once the drafts are known to fail"
    gaps = [b - a for a, b in pairwise(shadows)]
    assert shadows[0] <= SHADOW_GAP + 2 and gaps[0] == 2 * SHADOW_GAP  # each one failed
    assert gaps == sorted(gaps) and gaps[-1] == MAX_SHADOW_GAP


def test_one_accepted_draft_keeps_narrow_blocks_not_ar():
    widths = [w for w, _ in _run(CPU_LIKE, lambda w: min(1, w - 1))]
    assert 1 not in widths and set(widths[5:]) <= {2, 4}


def test_shadow_drafts_bring_speculation_back_when_the_text_turns_known():
    """While it takes AR steps the policy verifies nothing; only its shadow drafts can see
    that the drafter now knows the text."""
    known = [False]
    policy = AdaptiveWidth(FrozenCosts(CPU_LIKE), 16)
    history, _ = _drive(policy, lambda w: w - 1 if known[0] else 0, 30)
    assert history[-1][0] == 1  # fell back while the drafts were wrong
    known[0] = True
    history, shadows = _drive(policy, lambda w: w - 1 if known[0] else 0, 60)
    widths = [w for w, _ in history]
    assert shadows and min(i for i, w in enumerate(widths) if w > 1) == shadows[0] + 1
    assert widths[-1] == 16


def test_a_failed_opening_falls_back_whatever_the_carried_acceptance():
    """A sequence after one the drafter knew by heart: its counts still say draft wide, but
    the text changed, and two failed rounds before any accepted draft stop verifying."""
    known = AdaptiveWidth(FrozenCosts(CPU_LIKE), 16)
    _drive(known, lambda w: w - 1, 40)
    unknown = AdaptiveWidth(FrozenCosts(CPU_LIKE), 16, known.acceptance)
    history, _ = _drive(unknown, lambda w: 0, 12)
    widths = [w for w, _ in history]
    assert all(w > 1 for w in widths[:FAILED_OPENING]) and widths[FAILED_OPENING:] == [1] * 10
    assert unknown.acceptance.probs()[0] > 0.4  # the counts alone would have drafted on


def test_a_new_engines_first_sequence_drafts_again_after_one_failed_round():
    """A `generate` run's only sequence has no counts carried from earlier ones: one failed
    opening round must not end drafting alone (it sent the README's example to AR steps,
    although its next anchors accept drafts); the failed-opening rule still bounds it."""
    policy = AdaptiveWidth(FrozenCosts(CPU_2_CORES), 16)
    outcomes = iter([0, 1, 2, 3])
    history, _ = _drive(policy, lambda w: min(next(outcomes), w - 1), 4)
    assert history[0] == (8, 0) and all(w > 1 for w, _ in history[1:])
    unknown = AdaptiveWidth(FrozenCosts(CPU_2_CORES), 16)
    history, _ = _drive(unknown, lambda w: 0, 6)
    assert [w > 1 for w, _ in history] == [True] * FAILED_OPENING + [False] * 4


def test_failures_after_an_accepted_draft_are_left_to_the_counts():
    """Mid-answer, a few failed rounds in a row are common on text the drafter knows well."""
    known = AdaptiveWidth(FrozenCosts(CPU_LIKE), 16)
    _drive(known, lambda w: w - 1, 40)
    policy = AdaptiveWidth(FrozenCosts(CPU_LIKE), 16, known.acceptance)
    outcomes = iter([3] + [0] * (FAILED_OPENING + 1))
    history, _ = _drive(policy, lambda w: min(next(outcomes), w - 1), FAILED_OPENING + 2)
    assert all(w > 1 for w, _ in history)


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


def test_only_a_shadow_that_would_have_paid_sends_the_next_round_to_drafting():
    policy = AdaptiveWidth(FrozenCosts(CPU_LIKE), 16)
    _drive(policy, lambda w: 0, 40)  # fallen back: the counts say the drafter is wrong
    policy.observe_shadow(2, 0)
    assert policy.next_width() == 1
    policy.observe_shadow(SHADOW_HORIZON + 1, SHADOW_HORIZON)  # 5 tokens for a 1.2-1.8 round
    assert policy.next_width() > 1


def test_a_shadow_check_reports_what_a_greedy_verify_would_have_accepted():
    """The loop and the simulator share this rule: (width, accepted) at the first wrong draft,
    when every draft matched, or what matched so far when the AR steps end."""
    reads = []

    def drafts() -> list[int]:
        reads.append(1)
        return [5, 6, 7, 8]

    wrong = ShadowCheck(drafts)
    assert not reads  # read at the first token, not when drafted
    assert [wrong.see(5), wrong.see(6), wrong.see(0)] == [None, None, (4, 2)]
    assert len(reads) == 1
    right = ShadowCheck(drafts)
    assert [right.see(t) for t in (5, 6, 7, 8)] == [None, None, None, (5, 4)]
    cut = ShadowCheck(drafts)
    assert cut.end() is None  # no token seen: nothing to report
    cut.see(5)
    assert cut.end() == (2, 1)
