"""Sampled fused decoding follows the target's distribution exactly, and seeds reproduce."""

from __future__ import annotations

from collections import Counter
from itertools import product

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare
from tiny import drafter_config, make_target, save_random_drafter

from mlx_engine.drafter import load_drafter
from mlx_engine.policy import FixedWidth
from mlx_engine.proposer import DFlashDraftSource, DraftHead
from mlx_engine.sampling import (
    Sampler,
    SamplingParams,
    filtered,
    make_sampler,
    probs,
    top_p_choice,
)
from mlx_engine.speculative import DecodeStats, ar_stream, collect, fused_stream
from mlx_engine.verifier import Verifier

V = 6  # tiny vocab: every joint outcome of two tokens gets many samples
PROMPT = [2, 3, 4, 1, 3, 2, 4, 0, 1, 2] * 3  # 30 tokens, longer than the window
PARAMS = SamplingParams(temp=1.0)
RUNS = 1500


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    verifier = Verifier(make_target("gemma3_text", seed=2, vocab=V))
    path = tmp_path_factory.mktemp("drafter")
    save_random_drafter(path, drafter_config(verifier.num_layers, block_size=4, vocab=V))
    drafter = load_drafter(path)
    verifier.set_taps(drafter.config.target_layer_ids)
    return verifier, drafter


def _next_probs(verifier: Verifier, tokens: list[int]) -> np.ndarray:
    logits = verifier.forward(mx.array([tokens]), verifier.make_cache(), with_taps=False).logits
    return np.array(probs(logits[0, -1], PARAMS))


def _exact_joint(verifier: Verifier) -> dict[tuple[int, int, int], float]:
    """P(t0, t1, t2 | prompt) under the target alone, by enumeration."""
    p0 = _next_probs(verifier, PROMPT)
    joint = {}
    for t0 in range(V):
        p1 = _next_probs(verifier, [*PROMPT, t0])
        for t1 in range(V):
            p2 = _next_probs(verifier, [*PROMPT, t0, t1])
            for t2 in range(V):
                joint[t0, t1, t2] = float(p0[t0] * p1[t1] * p2[t2])
    return joint


def _fused(verifier, drafter, seed: int, n: int = 3, head: DraftHead | None = None) -> list[int]:
    source = DFlashDraftSource(drafter, verifier, head)
    return collect(fused_stream(verifier, source, PROMPT, n, FixedWidth(4),
                                sampler=make_sampler(PARAMS, seed, V)))


def _pooled_chisquare(counts: Counter, expected: dict, total: int) -> float:
    """p-value of counts vs expected, pooling cells expected below 5 into one."""
    obs, exp, small_obs, small_exp = [], [], 0, 0.0
    for key, p in expected.items():
        if p * total >= 5:
            obs.append(counts.get(key, 0))
            exp.append(p * total)
        else:
            small_obs += counts.get(key, 0)
            small_exp += p * total
    if small_exp > 0:
        obs.append(small_obs)
        exp.append(small_exp)
    exp = np.array(exp) * (sum(obs) / sum(exp))
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("draft_vocab", [None, [0, 2, 3, 5]], ids=["full", "draft-vocab"])
def test_emitted_tokens_follow_the_target_distribution(pair, draft_vocab):
    """Also when drafts come from a vocabulary subset: q is 0 outside it, still exact."""
    verifier, drafter = pair
    joint = _exact_joint(verifier)
    head = DraftHead(verifier, None if draft_vocab is None else mx.array(draft_vocab))
    runs = [tuple(_fused(verifier, drafter, seed, head=head)) for seed in range(RUNS)]
    pair_joint: dict[tuple[int, int], float] = Counter()
    for (t0, t1, _), p in joint.items():
        pair_joint[t0, t1] += p
    third: dict[int, float] = Counter()
    for (_, _, t2), p in joint.items():
        third[t2] += p
    assert _pooled_chisquare(Counter(r[:2] for r in runs), pair_joint, RUNS) > 1e-3
    assert _pooled_chisquare(Counter(r[2] for r in runs), third, RUNS) > 1e-3
    assert _pooled_chisquare(Counter(runs), joint, RUNS) > 1e-3


def test_the_chi_square_check_has_power(pair):
    """Sampling t1 from the drafter instead of the target is caught by the same check."""
    verifier, drafter = pair
    p0 = _next_probs(verifier, PROMPT)
    source = DFlashDraftSource(drafter, verifier)
    wrong: Counter = Counter()
    rng = np.random.default_rng(0)
    t0_draws = rng.choice(V, size=RUNS, p=p0 / p0.sum())
    draft_p = {}
    for t0 in range(V):
        cache = verifier.make_cache()
        source = DFlashDraftSource(drafter, verifier)
        verifier.prefill(mx.array([PROMPT]), cache, source.extend)
        draft_p[t0] = np.array(probs(source.draft_logits(mx.array([t0]), 4)[0], PARAMS))
    for t0 in t0_draws:
        q = draft_p[int(t0)]
        wrong[int(t0), int(rng.choice(V, p=q / q.sum()))] += 1
    truth: dict[tuple[int, int], float] = {}
    for t0, t1 in product(range(V), range(V)):
        truth[t0, t1] = float(p0[t0] * _next_probs(verifier, [*PROMPT, t0])[t1])
    assert _pooled_chisquare(wrong, truth, RUNS) < 1e-3


def test_fixed_seed_reproduces_and_seeds_differ(pair):
    verifier, drafter = pair
    a = _fused(verifier, drafter, seed=7, n=24)
    assert a == _fused(verifier, drafter, seed=7, n=24)
    assert any(_fused(verifier, drafter, seed=s, n=24) != a for s in (8, 9, 10))


def test_top_k_and_top_p_restrict_the_support():
    logits = mx.array([[3.0, 2.0, 1.0, 0.0, -1.0]])
    top_k = probs(logits, SamplingParams(temp=1.0, top_k=2))[0].tolist()
    assert all(p == 0 for p in top_k[2:]) and abs(sum(top_k) - 1) < 1e-6
    top_p = probs(logits, SamplingParams(temp=1.0, top_p=0.7))[0].tolist()
    assert top_p[0] > 0 and top_p[1] > 0 and all(p == 0 for p in top_p[2:])


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_most_likely_set_reaching_its_mass(top_p):
    """Against a numpy reference on rows of shuffled logits: tokens by falling probability,
    each kept while the mass before it is below top_p."""
    logits = mx.random.normal((6, 500), key=mx.random.key(3)) * 2
    kept = probs(logits, SamplingParams(temp=0.8, top_p=top_p)) > 0
    p = np.array(mx.softmax(logits / 0.8, axis=-1))
    for row, want_row in zip(np.array(kept), p, strict=True):
        order = np.argsort(-want_row)
        before = np.cumsum(want_row[order]) - want_row[order]
        want = np.zeros_like(row)
        want[order[before < top_p]] = True
        assert (row == want).all()
        assert 1 <= row.sum() < 500


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_choice_is_the_sorts_sample_on_every_row_it_is_sure_of(top_p):
    """Rows from flat to peaked, so top-p sets run from one token to thousands: the fast route
    with its default candidates settles all of them; with 8 candidates the sets larger than
    8 are settled by testing noisy argmaxes (most, not all); with neither route, none."""
    rows, vocab = 96, 3000
    scale = mx.linspace(0.2, 8, rows)[:, None]
    scores = mx.random.normal((rows, vocab), key=mx.random.key(5)) * scale
    noise = mx.random.gumbel((rows, vocab), key=mx.random.key(6))
    sample = np.array(mx.argmax(filtered(scores, SamplingParams(1.0, top_p=top_p)) + noise, -1))
    p = np.sort(np.array(mx.softmax(scores, axis=-1)), axis=-1)[:, ::-1]
    set_size = ((np.cumsum(p, axis=-1) - p) < top_p).sum(-1)
    settled = {}
    for route in [(1024, 2), (8, 2), (8, 0), (1, 0)]:
        tokens, sure = (np.array(a) for a in top_p_choice(scores, noise, top_p, *route))
        assert (tokens[sure] == sample[sure]).all()
        settled[route] = sure
    assert settled[1024, 2].all() and set_size.max() > 1024
    assert (settled[8, 0] == (set_size < 8)).all() and 0 < settled[8, 0].sum() < rows
    chain_settled = settled[8, 2] & ~settled[8, 0]
    assert chain_settled.sum() > 0.5 * (~settled[8, 0]).sum()
    assert not settled[1, 0].any()


class CountingGreedy(Sampler):
    """Greedy, counting who asks it for what."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def choose(self, logits, position):
        self.calls["choose", logits.shape[0]] += 1
        return super().choose(logits, position)

    def draft(self, logits, position, vocab_ids=None):
        self.calls["draft"] += 1
        return super().draft(logits, position, vocab_ids)


def test_the_sampler_is_the_seam_the_proposer_and_the_loop_each_call_once(pair):
    verifier, drafter = pair
    sampler, stats = CountingGreedy(), DecodeStats()
    source = DFlashDraftSource(drafter, verifier)
    fused = collect(fused_stream(verifier, source, PROMPT, 24, FixedWidth(4), sampler=sampler,
                                 stats=stats))
    assert fused == collect(ar_stream(verifier, PROMPT, 24))
    assert sampler.calls == {("choose", 1): 1, "draft": stats.blocks,
                             ("choose", 4): stats.blocks}
