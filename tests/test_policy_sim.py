"""The policy simulator (scripts/policy_sim.py) on synthetic acceptance tables."""

from __future__ import annotations

import pytest
from tiny import load_script

from mlx_engine.policy import Acceptance, AdaptiveWidth, RoundCosts

COSTS = {1: 1.0, 2: 1.4, 4: 1.4, 8: 1.5, 16: 1.9}


@pytest.fixture(scope="module")
def sim():
    return load_script("policy_sim.py")


def _simulate(sim, accepted: list[int], acceptance: Acceptance | None = None) -> dict:
    policy = AdaptiveWidth(RoundCosts(COSTS), 16, acceptance)
    return sim.simulate_prompt(policy, accepted, COSTS, shadow_cost=0.25)


def test_a_known_text_is_drafted_wide_and_beats_ar(sim):
    n = 200
    result = _simulate(sim, [n - 1 - j for j in range(n)])  # every draft right to the end
    assert result["ar_steps"] <= 2 and result["failed_blocks"] == 0
    # 199 decode tokens in rounds of at most 16 tokens, each 1.9 AR steps at most
    assert result["fused_vs_ar"] > 199 / (1.9 * (199 / 15 + 2))


def test_an_unknown_text_falls_back_to_ar_steps_with_shadow_drafts(sim):
    result = _simulate(sim, [0] * 300)
    assert result["blocks"] <= 4 and result["shadows"] >= 5
    assert result["ar_steps"] + result["blocks"] >= 296  # every token committed once
    assert 0.95 < result["fused_vs_ar"] < 1.0  # the failed blocks and the shadows' cost


def test_the_acceptance_a_run_learns_carries_to_the_next(sim):
    acceptance = Acceptance(16)
    _simulate(sim, [0] * 100, acceptance)
    after_unknown = _simulate(sim, [15] * 40, Acceptance(16))
    _simulate(sim, [0] * 100, acceptance)
    carried = _simulate(sim, [15] * 40, acceptance)
    assert carried["fused_vs_ar"] < after_unknown["fused_vs_ar"]  # it starts from AR steps
