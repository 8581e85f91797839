"""Fused decoding must be token-identical to plain AR, past the sliding window too: greedy, and
sampled with the same seed."""

from __future__ import annotations

import random
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step, speculative_generate_step
from tiny import (
    VOCAB,
    WINDOW,
    drafter_config,
    make_target,
    prompt_tokens,
    save_random_drafter,
)

from mlx_engine.drafter import load_drafter
from mlx_engine.policy import AdaptiveWidth, FixedWidth, RoundCosts
from mlx_engine.proposer import DFlashDraftSource
from mlx_engine.sampling import GumbelMax, Sampler, SamplingParams, make_sampler
from mlx_engine.speculative import DecodeStats, ar_stream, collect, fused_stream
from mlx_engine.verifier import Verifier

FAMILIES = ["gemma3_text", "gemma4_text", "qwen3", "llama", "qwen3_5", "qwen3_5_moe", "qwen3_next",
            "gemma4"]
PROMPT_LEN = 3 * WINDOW
NEW_TOKENS = 64


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(verifier, drafter) with a random drafter saved in z-lab format and loaded back."""
    verifier = Verifier(make_target(request.param))
    path = tmp_path_factory.mktemp(request.param)
    save_random_drafter(path, drafter_config(verifier.num_layers, block_size=16))
    drafter = load_drafter(path)
    verifier.set_taps(drafter.config.target_layer_ids)
    return verifier, drafter


def _ar(verifier: Verifier, prompt: list[int], n: int = NEW_TOKENS, **kw) -> list[int]:
    return collect(ar_stream(verifier, prompt, n, **kw))


@pytest.mark.parametrize("block_size", [2, 4, 8, 16])
def test_fused_equals_ar(pair, block_size):
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN)
    stats = DecodeStats()
    fused = collect(
        fused_stream(verifier, DFlashDraftSource(drafter, verifier), prompt, NEW_TOKENS,
                     FixedWidth(block_size), stats=stats)
    )
    assert fused == _ar(verifier, prompt)
    assert len(fused) == NEW_TOKENS and len(set(fused)) > 5  # a real, non-constant sequence
    assert stats.syncs_per_block == 2


def test_single_graph_mode_is_lossless_with_one_sync(pair, monkeypatch):
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=3)
    stats = DecodeStats()
    real_async_eval, queued = mx.async_eval, []
    monkeypatch.setattr(mx, "async_eval", lambda *a: (queued.append(a), real_async_eval(*a)))
    fused = collect(
        fused_stream(verifier, DFlashDraftSource(drafter, verifier), prompt, NEW_TOKENS,
                     FixedWidth(8), graph="single", stats=stats)
    )
    monkeypatch.undo()
    assert fused == _ar(verifier, prompt)
    assert stats.syncs_per_block == 1
    # per block: the drafts (so the device drafts while the host builds the verify) and the
    # drafter-context extension
    assert len(queued) == 2 * stats.blocks


def test_ar_oracle_matches_mlx_lm_native_cache(pair):
    """Our all-KVCache layout reproduces mlx-lm's own decoding with its native caches."""
    verifier, _ = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=5)
    native = [t for t, _ in generate_step(mx.array(prompt), verifier.model, max_tokens=48)]
    assert _ar(verifier, prompt, 48) == native


def test_stop_token_ends_both_loops_at_the_same_place(pair):
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=7)
    reference = _ar(verifier, prompt)
    stop = reference[20]
    first = reference.index(stop)
    stats = DecodeStats()
    fused = collect(
        fused_stream(verifier, DFlashDraftSource(drafter, verifier), prompt, NEW_TOKENS,
                     FixedWidth(4), stop_ids=frozenset([stop]), stats=stats)
    )
    assert fused == reference[: first + 1] == _ar(verifier, prompt, stop_ids=frozenset([stop]))
    assert stats.finish_reason == "stop"


class ForcedSource(DFlashDraftSource):
    """Drafts the true continuation for `correct` positions, then a wrong token."""

    def __init__(self, drafter, verifier, prompt_len: int, reference: list[int], correct: int):
        super().__init__(drafter, verifier)
        self.prompt_len, self.reference, self.correct = prompt_len, reference, correct

    def propose(self, anchor, block_size, sampler, position):
        real = super().propose(anchor, block_size, sampler, position)  # keep the drafter running
        g = self.context_len - self.prompt_len  # index of the anchor among generated tokens
        truth = self.reference[g + 1 : g + block_size]
        forced = [t if i < self.correct else (t + 1) % VOCAB for i, t in enumerate(truth)]
        return real * 0 + mx.array(forced, dtype=mx.int32)


@pytest.mark.parametrize("block_size", [4, 8])
def test_every_acceptance_count_commits_exactly(pair, block_size):
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=11)
    reference = _ar(verifier, prompt, NEW_TOKENS + block_size)
    for correct in range(block_size):
        stats = DecodeStats()
        source = ForcedSource(drafter, verifier, len(prompt), reference, correct)
        fused = collect(
            fused_stream(verifier, source, prompt, NEW_TOKENS, FixedWidth(block_size),
                         stats=stats)
        )
        assert fused == reference[:NEW_TOKENS], f"accepting {correct} drafts broke exactness"
        assert set(stats.accepted) == {correct}


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_text", "llama"])  # sliding ones
def test_mlx_lm_speculative_decoding_diverges_past_the_window(family):
    """mlx-lm cannot trim a wrapped RotatingKVCache: its output silently departs from AR."""
    verifier = Verifier(make_target(family))
    draft_model = make_target(family, seed=5)

    def mlx_lm_spec(prompt: list[int], n: int) -> list[int]:
        steps = speculative_generate_step(
            mx.array(prompt), verifier.model, draft_model, num_draft_tokens=4, max_tokens=n
        )
        return [t for t, _, _ in steps]

    short = prompt_tokens(4, seed=13)  # never wraps: mlx-lm is still exact here
    assert mlx_lm_spec(short, WINDOW - 8) == _ar(verifier, short, WINDOW - 8)
    long = prompt_tokens(PROMPT_LEN, seed=13)
    assert mlx_lm_spec(long, 32) != _ar(verifier, long, 32)


def test_drafter_round_trip_through_disk(tmp_path: Path):
    config = drafter_config(6)
    save_random_drafter(tmp_path, config, seed=4)
    a, b = load_drafter(tmp_path), load_drafter(tmp_path)
    cache_a, cache_b = a.make_context_cache(), b.make_context_cache()
    taps = mx.random.normal((1, 5, 2 * 64), key=mx.random.key(0))
    a.extend_context(taps, cache_a)
    b.extend_context(taps, cache_b)
    emb = mx.random.normal((VOCAB, 64), key=mx.random.key(1))
    logits_a = a.draft_logits(mx.array([[3, 96, 96, 96]]), cache_a, lambda i: emb[i],
                              lambda h: h @ emb.T)
    logits_b = b.draft_logits(mx.array([[3, 96, 96, 96]]), cache_b, lambda i: emb[i],
                              lambda h: h @ emb.T)
    assert logits_a.shape == (1, 3, VOCAB)
    assert mx.array_equal(logits_a, logits_b)


class PhasedSource(ForcedSource):
    """Wrong drafts for the first `switch` generated tokens, then the true continuation: the
    text turns from one the drafter does not know into one it does."""

    def __init__(self, drafter, verifier, prompt_len: int, reference: list[int], switch: int):
        super().__init__(drafter, verifier, prompt_len, reference, correct=0)
        self.switch = switch
        self.proposals: list[tuple[int, int]] = []  # (generated index of the anchor, width)

    def propose(self, anchor, block_size, sampler, position):
        g = self.context_len - self.prompt_len
        self.proposals.append((g, block_size))
        self.correct = 0 if g < self.switch else block_size
        return super().propose(anchor, block_size, sampler, position)


class FrozenCosts(RoundCosts):
    """Round costs of a CPU-like device that ignore the tiny models' real timings."""

    def observe(self, width: int, seconds: float) -> None:
        pass


def test_adaptive_policy_falls_back_to_ar_and_climbs_back_losslessly(pair):
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=17)
    switch, n = 40, 176
    reference = _ar(verifier, prompt, n + 16)
    source = PhasedSource(drafter, verifier, len(prompt), reference, switch)
    costs = FrozenCosts({1: 1.0, 2: 1.2, 4: 1.3, 8: 1.5, 16: 1.8})
    stats = DecodeStats()
    fused = collect(fused_stream(verifier, source, prompt, n, AdaptiveWidth(costs, 16),
                                 stats=stats))
    assert fused == reference[:n]
    before = [w for g, w in source.proposals if g < switch]
    after = [w for g, w in source.proposals if g >= switch]
    assert stats.ar_steps >= 20, "wrong drafts must send the policy to plain AR steps"
    assert len(before) <= 8, "and it must not keep probing at every AR step"
    assert after and after[-1] == 16, "right drafts must win the full width back"
    assert stats.accepted[-1] == 15


def test_a_narrow_round_verifies_the_first_drafts_of_the_full_block(pair):
    """The drafter's block attends both ways, so a round of any width drafts the trained
    block (anchor + B-1 masks) and verifies its first drafts, never a shorter block."""
    verifier, drafter = pair
    source = DFlashDraftSource(drafter, verifier)
    cache = verifier.make_cache()
    verifier.prefill(mx.array([prompt_tokens(40, seed=5)]), cache, source.extend)
    anchor = mx.array([7], dtype=mx.int32)
    full = source.draft_logits(anchor, 16)
    for width in (2, 4, 8):
        narrow = source.draft_logits(anchor, width)
        assert narrow.shape[0] == width - 1
        assert mx.allclose(narrow, full[: width - 1], atol=1e-5)
    assert drafter.config.block_size == 16


class ShadowEveryStep:
    """Plain AR steps only, drafting in the shadow whenever no shadow is pending (or never);
    keeps every shadow's outcome."""

    max_width = 16

    def __init__(self, shadows: bool):
        self.shadows = shadows
        self.outcomes: list[tuple[int, int]] = []

    def next_width(self) -> int:
        return 1

    def record(self, width: int, accepted: int, seconds: float) -> None:
        pass

    def shadow_due(self) -> bool:
        return self.shadows

    def observe_shadow(self, width: int, accepted: int) -> None:
        self.outcomes.append((width, accepted))


def test_shadow_drafts_measure_acceptance_and_leave_output_and_context_alone(pair):
    """Blocks drafted during AR steps are checked against the tokens AR commits next (here
    right for 3 drafts, then wrong) and change neither the output nor the drafter's context
    rows, which they extend early."""
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=23)
    n = 48
    reference = _ar(verifier, prompt, n + 16)
    runs = {}
    for shadows in (True, False):
        source = ForcedSource(drafter, verifier, len(prompt), reference, correct=3)
        policy, stats = ShadowEveryStep(shadows), DecodeStats()
        tokens = collect(fused_stream(verifier, source, prompt, n, policy, stats=stats))
        runs[shadows] = tokens, source, policy, stats
    tokens, source, policy, stats = runs[True]
    plain_tokens, plain_source, _, plain_stats = runs[False]
    assert tokens == plain_tokens == reference[:n]
    assert stats.ar_steps == n - 1 and stats.shadows >= 8 and plain_stats.shadows == 0
    assert set(policy.outcomes[:-1]) == {(5, 3)}  # the last may end with the run
    for a, b in zip(source.cache, plain_source.cache, strict=True):
        assert a.offset == b.offset >= len(prompt) + n - 1
        assert mx.allclose(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :], atol=1e-5)
        assert mx.allclose(a.values[..., : a.offset, :], b.values[..., : b.offset, :], atol=1e-5)


class RandomWidthsWithShadows(ShadowEveryStep):
    """Any width 1..16 in any order, a shadow draft whenever none is pending."""

    def __init__(self, seed: int):
        super().__init__(shadows=True)
        self.rng = random.Random(seed)

    def next_width(self) -> int:
        return self.rng.choice([1, 1, 2, 3, 5, 8, 16])


SAMPLED = SamplingParams(temp=0.8, top_k=40, top_p=0.95)


@pytest.mark.parametrize("policy", ["fixed-4", "fixed-16", "random"])
def test_sampled_fused_equals_sampled_ar_for_the_same_seed(pair, policy):
    """Gumbel-max noise drawn per (seed, position): the widths, AR steps and shadow drafts
    cannot change what is sampled, and another seed samples something else."""
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=29)

    def sampler(seed):
        return make_sampler(SAMPLED, seed, verifier.vocab_size)

    width = (RandomWidthsWithShadows(3) if policy == "random"
             else FixedWidth(int(policy.split("-")[1])))
    stats = DecodeStats()
    fused = collect(fused_stream(verifier, DFlashDraftSource(drafter, verifier), prompt,
                                 NEW_TOKENS, width, sampler=sampler(7), stats=stats))
    ar = _ar(verifier, prompt, sampler=sampler(7))
    assert fused == ar and len(set(fused)) > 5
    assert ar != _ar(verifier, prompt, sampler=sampler(8))
    assert ar != _ar(verifier, prompt)  # not the greedy answer
    if policy == "random":
        assert stats.ar_steps > 0 and stats.blocks > 0 and stats.shadows > 0


TOP_P = SamplingParams(temp=0.8, top_p=0.9)


class SortedTopP(GumbelMax):
    """Top-p by the sort of every row: the definition the fast route must reproduce."""

    def choose(self, logits, position):
        return Sampler.choose(self, logits, position)


class CountingSettles(GumbelMax):
    """Top-p by the fast route, counting rows it was unsure of and in-graph guesses taken back."""

    def __init__(self, seed: int, candidates: int, chain: int):
        super().__init__(TOP_P, seed, VOCAB, candidates, chain)
        self.settles = self.wrong_guesses = 0

    def read(self, choice):
        tokens, guessed = super().read(choice)
        self.wrong_guesses += not guessed
        return tokens, guessed

    def settled(self, choice):
        self.settles += 1
        return super().settled(choice)


@pytest.mark.parametrize("route", [(1, 0), (8, 2)], ids=["always-unsure", "few-candidates"])
def test_top_p_rows_the_fast_route_is_unsure_of_are_settled_as_the_sort_does(pair, route):
    """Unsure rows are chosen again before they are committed: the AR loops take back a step
    queued on a wrong guess, a drafted round settles its acceptance again."""
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=37)
    want = _ar(verifier, prompt, sampler=SortedTopP(TOP_P, 7, VOCAB))
    assert want != _ar(verifier, prompt, sampler=make_sampler(SamplingParams(0.8), 7, VOCAB))
    ar_sampler = CountingSettles(7, *route)
    assert _ar(verifier, prompt, sampler=ar_sampler) == want
    for policy in (FixedWidth(4), RandomWidthsWithShadows(5)):
        sampler, stats = CountingSettles(7, *route), DecodeStats()
        fused = collect(fused_stream(verifier, DFlashDraftSource(drafter, verifier), prompt,
                                     NEW_TOKENS, policy, sampler=sampler, stats=stats))
        assert fused == want
        if route == (1, 0):
            assert sampler.settles > 0 and (stats.ar_steps == 0 or sampler.wrong_guesses > 0)
    if route == (1, 0):  # the guess is the most likely token: often not the sample
        assert ar_sampler.wrong_guesses > 0 and stats.ar_steps > 0


class TargetDraftSource(DFlashDraftSource):
    """Drafts from the target's own logits at the block's positions (the drafter still runs):
    with the run's noise at the right positions, every draft is the target's own sample."""

    def __init__(self, drafter, verifier, prompt: list[int], reference: list[int]):
        super().__init__(drafter, verifier)
        full = mx.array([prompt + reference])
        self.target_logits = verifier.forward(full, verifier.make_cache(),
                                              with_taps=False).logits[0]

    def draft_logits(self, anchor, block_size):
        real = super().draft_logits(anchor, block_size)
        at = self.context_len  # the anchor's index: its row chooses the first draft
        return real[:, :1] * 0 + self.target_logits[at : at + block_size - 1]


def test_sampled_drafts_and_shadows_share_the_verifiers_noise(pair):
    """A drafter that knew the target's logits would draft exactly its samples, so every
    draft is accepted, in rounds and in shadows: drafts use the noise of their positions."""
    verifier, drafter = pair
    prompt = prompt_tokens(PROMPT_LEN, seed=31)
    n = 48
    reference = _ar(verifier, prompt, n + 16, sampler=make_sampler(SAMPLED, 5, verifier.vocab_size))
    for policy in (FixedWidth(8), ShadowEveryStep(shadows=True)):
        source = TargetDraftSource(drafter, verifier, prompt, reference)
        stats = DecodeStats()
        fused = collect(fused_stream(verifier, source, prompt, n, policy, stats=stats,
                                     sampler=make_sampler(SAMPLED, 5, verifier.vocab_size)))
        assert fused == reference[:n]
        if stats.blocks:
            assert sum(stats.accepted) >= 0.9 * 7 * stats.blocks
        else:
            assert len(policy.outcomes) >= 6
            assert sum(a for _, a in policy.outcomes) >= 0.9 * 4 * len(policy.outcomes)
