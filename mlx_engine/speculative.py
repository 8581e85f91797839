"""The fused DFlash loop and the AR oracle, over the same verifier and cache layout.

Fused, per block: draft B-1 tokens in one drafter forward -> verify [anchor, drafts] in one
target forward that also yields the drafter's context taps -> accept in-graph -> read back
once -> trim the rejected rows -> queue the drafter context extension. In `two-phase` graph
mode the drafter graph is materialised before the verifier graph is built (one graph for
both has made Metal evaluation pathologically slow): 2 host syncs per block. `single` only
queues the drafts, so the device drafts while the host builds the verify: 1 sync per block.
A round of width 1 is a plain AR step (`_ar_segment`): the width policy's fallback, during
which a block drafted now and then in the shadow keeps measuring acceptance.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import KVCache

from .policy import SHADOW_HORIZON, ShadowCheck, WidthPolicy
from .proposer import DraftSource
from .sampling import GREEDY, Choice, Sampler, accept_drafts
from .verifier import Verifier

GraphMode = Literal["two-phase", "single"]
GRAPH_MODES: tuple[str, ...] = get_args(GraphMode)


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a prompt cache already held (not prefilled)
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    host_syncs: int = 0
    blocks: int = 0  # drafted rounds (host_syncs counts theirs)
    accepted: list[int] = field(default_factory=list)  # drafts accepted per block
    widths: list[int] = field(default_factory=list)  # verified rows per block
    ar_steps: int = 0  # rounds the width policy spent on plain AR steps (one sync each)
    shadows: int = 0  # blocks drafted during AR steps to measure acceptance, never verified
    draft_s: float = 0.0
    verify_s: float = 0.0
    extend_s: float | None = None
    finish_reason: str = "length"
    peak_memory_gb: float = 0.0  # set by Engine.generate: the device's peak during the run

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens prefilled (a prompt cache's excluded) per second of prefill."""
        done = self.prompt_tokens - self.cached_tokens
        return done / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def rounds(self) -> int:
        """Target forwards after prefill: drafted blocks and plain AR steps."""
        return self.blocks + self.ar_steps

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first, per second of decode (the first comes from prefill)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def mean_accept_len(self) -> float:
        """Tokens committed per verify forward: accepted drafts + the bonus token."""
        return sum(a + 1 for a in self.accepted) / len(self.accepted) if self.accepted else 0.0

    @property
    def syncs_per_block(self) -> float:
        return self.host_syncs / self.blocks if self.blocks else 0.0

    @property
    def e2e_tok_s(self) -> float:
        """All new tokens per second of prefill + decode (what a user waits for)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


def _next_position(cache: list[KVCache]) -> int:
    """The sequence index of the token the next forward's first row chooses: that forward's
    first input goes in at the cache's offset. The sampler's noise is keyed by it."""
    return cache[0].offset + 1


def _stop_index(tokens: list[int], stop_ids: frozenset[int]) -> int | None:
    return next((i for i, t in enumerate(tokens) if t in stop_ids), None)


class _Emitter:
    """Applies max-tokens and stop tokens to what a loop produces; owns the stats. Decode
    time runs from the first token (which prefill produces) to the latest."""

    def __init__(self, stats: DecodeStats, max_tokens: int, stop_ids: frozenset[int]):
        self.stats, self.max_tokens, self.stop_ids = stats, max_tokens, stop_ids
        self.done = False
        self.decode_start: float | None = None

    def take(self, tokens: list[int]) -> list[int]:
        if self.decode_start is None:
            self.decode_start = time.perf_counter()
        else:
            self.stats.decode_s = time.perf_counter() - self.decode_start
        tokens = tokens[: self.max_tokens - self.stats.new_tokens]
        stop = _stop_index(tokens, self.stop_ids)
        if stop is not None:
            tokens = tokens[: stop + 1]
            self.stats.finish_reason, self.done = "stop", True
        self.stats.new_tokens += len(tokens)
        if self.stats.new_tokens >= self.max_tokens:
            self.done = True
        return tokens


def _on_generation_stream(
    loop: Callable[..., Iterator[list[int]]],
) -> Callable[..., Iterator[list[int]]]:
    """Run a decoding loop on mlx-lm's generation stream, as its `generate_step` does, so the
    bench's arms (ours and mlx-lm's) all run on one stream: a GPU's default stream times
    differently, and the comparison would measure the streams.
    """

    @functools.wraps(loop)
    def run(*args, **kwargs) -> Iterator[list[int]]:
        with mx.stream(generation_stream):
            yield from loop(*args, **kwargs)

    return run


def _prefill(
    verifier: Verifier,
    prompt: list[int],
    source: DraftSource | None,
    sampler: Sampler,
    stats: DecodeStats,
    cache: list[KVCache] | None,
) -> tuple[list[KVCache], int]:
    """Fill the cache with the prompt (past the rows a prompt cache already holds) and pick
    the first new token."""
    start = time.perf_counter()
    cache = verifier.make_cache() if cache is None else cache
    cached = cache[0].offset
    if cached and cached >= len(prompt):
        raise ValueError(f"a prompt cache of {cached} rows for a {len(prompt)}-token prompt")
    on_taps = None
    if source is not None:

        def on_taps(taps: mx.array) -> None:
            source.extend(taps)
            mx.eval(source.pending())

    logits = verifier.prefill(mx.array([prompt[cached:]], dtype=mx.int32), cache, on_taps)
    (first,), _ = sampler.read(sampler.choose(logits[0, -1:], len(prompt)))
    stats.prompt_tokens, stats.cached_tokens = len(prompt), cached
    stats.prefill_s = time.perf_counter() - start
    return cache, first


@_on_generation_stream
def ar_stream(
    verifier: Verifier,
    prompt: list[int],
    max_tokens: int,
    sampler: Sampler = GREEDY,
    stop_ids: frozenset[int] = frozenset(),
    stats: DecodeStats | None = None,
    cache: list[KVCache] | None = None,
) -> Iterator[list[int]]:
    """Plain incremental decoding, pipelined like mlx-lm's generate_step: the oracle.

    `cache`, if given, already holds the prompt's first `offset` tokens (a prompt cache's).
    """
    stats = stats if stats is not None else DecodeStats()
    cache, first = _prefill(verifier, prompt, None, sampler, stats, cache)
    emit = _Emitter(stats, max_tokens, stop_ids)
    yield emit.take([first])

    def step(token: mx.array) -> Choice:
        position = _next_position(cache)
        logits = verifier.forward(token.reshape(1, 1), cache, with_taps=False).logits
        choice = sampler.choose(logits[0, -1:], position)
        mx.async_eval(*choice.arrays())
        return choice

    next_y = step(mx.array([first], dtype=mx.int32))
    while not emit.done:
        y = next_y
        next_y = step(y.tokens)  # queued behind y, so the device never idles on the host
        (token,), guessed = sampler.read(y)
        if not guessed:  # the queued step went in with y's in-graph token: take it back
            verifier.trim(cache, 1)
            next_y = step(mx.array([token], dtype=mx.int32))
        stats.host_syncs += 1
        yield emit.take([token])


def _read_round(accepted: mx.array, emitted: mx.array,
                unsure: mx.array | None = None) -> list[int]:
    """A drafted round's one read-back: [accepted count, emitted tokens..., (unsure)]."""
    parts = [accepted[None], emitted]
    if unsure is not None:
        parts.append(unsure[None])
    return mx.concatenate([a.astype(mx.int32) for a in parts]).tolist()


class _RoundClock:
    """Seconds between consecutive round ends: what a round costs in steady state, the
    consumer's time included (as it is for the AR loop)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class _Shadow(ShadowCheck):
    """A block drafted during plain AR steps and never verified: the tokens AR commits next
    tell how many of its first SHADOW_HORIZON drafts a verify would have accepted, so
    the width policy keeps measuring acceptance while it does not draft (a drafter forward,
    no verify). It drafts with the run's sampler, so under sampling too the check is exact."""

    def __init__(self, source: DraftSource, taps: list[mx.array], anchor: int, max_width: int,
                 sampler: Sampler, position: int):
        """`taps`: the segment's rows not yet in the drafter's context, the last one the
        anchor's own (the anchor is the block's input, as in a drafted round); `position`:
        the first draft's."""
        source.extend(mx.concatenate(taps[:-1], axis=1))
        del taps[:-1]
        anchor_arr = mx.array([anchor], dtype=mx.int32)
        width = min(max_width, SHADOW_HORIZON + 1)  # the head scores only the checked drafts
        drafts = source.propose(anchor_arr, width, sampler, position)
        mx.async_eval(drafts, source.pending())
        super().__init__(drafts.tolist)


def _ar_segment(
    verifier: Verifier,
    source: DraftSource,
    cache: list[KVCache],
    anchor: int,
    policy: WidthPolicy,
    sampler: Sampler,
    emit: _Emitter,
    clock: _RoundClock,
) -> Generator[list[int], None, tuple[int, int]]:
    """Plain AR steps inside the fused loop, pipelined like `ar_stream` (the next step is
    queued before this one is read), for as long as the policy asks for width 1. Each step
    keeps its taps; they extend the drafter's context in one batch when the segment ends (or
    before a shadow draft), so drafting can resume at any token and a step costs what an
    oracle step costs plus the taps. Returns the width the policy chose next and the new
    anchor."""
    taps: list[mx.array] = []
    shadow: _Shadow | None = None

    def step(token: mx.array) -> Choice:
        position = _next_position(cache)
        block = verifier.forward(token.reshape(1, 1), cache)
        taps.append(block.taps)
        choice = sampler.choose(block.logits[0, -1:], position)
        mx.async_eval(*choice.arrays(), taps[-1])
        return choice

    y = step(mx.array([anchor], dtype=mx.int32))
    try:
        while True:
            width = policy.next_width()
            after_y = _next_position(cache)  # y's input is cached: the position after y's
            if width == 1:
                next_y = step(y.tokens)
            (token,), guessed = sampler.read(y)
            if width == 1 and not guessed:  # the queued step took y's in-graph token
                verifier.trim(cache, 1)
                taps.pop()
                next_y = step(mx.array([token], dtype=mx.int32))
            if shadow is not None and (outcome := shadow.see(token)) is not None:
                policy.observe_shadow(*outcome)
                shadow = None
            if width == 1 and shadow is None and policy.shadow_due():
                shadow = _Shadow(source, taps, token, policy.max_width, sampler, after_y)
                emit.stats.shadows += 1
            emit.stats.ar_steps += 1
            policy.record(1, 0, clock.lap())
            yield emit.take([token])
            if emit.done or width != 1:
                return width, token
            y = next_y
    finally:  # also when the consumer stops early: a prompt cache keeps the context rows
        if shadow is not None and (outcome := shadow.end()) is not None:
            policy.observe_shadow(*outcome)
        source.extend(mx.concatenate(taps, axis=1))
        mx.async_eval(source.pending())


@_on_generation_stream
def fused_stream(
    verifier: Verifier,
    source: DraftSource,
    prompt: list[int],
    max_tokens: int,
    policy: WidthPolicy,
    sampler: Sampler = GREEDY,
    stop_ids: frozenset[int] = frozenset(),
    graph: GraphMode = "two-phase",
    profile: bool = False,
    stats: DecodeStats | None = None,
    cache: list[KVCache] | None = None,
) -> Iterator[list[int]]:
    """Speculative decoding with a block drafter; token-identical to `ar_stream` with the same
    sampler (greedy, or sampled under the same seed).

    `policy` sets each round's width: 2..B verifies a drafted block, 1 takes plain AR steps;
    `sampler` chooses tokens and accepts drafts.
    Each drafted round appends its accepted-draft count to `stats.accepted` before it yields.
    `cache`, if given, already holds the prompt's first `offset` tokens, and `source` their
    drafter context rows (a prompt cache's).
    """
    stats = stats if stats is not None else DecodeStats()
    cache, first = _prefill(verifier, prompt, source, sampler, stats, cache)
    emit = _Emitter(stats, max_tokens, stop_ids)
    yield emit.take([first])
    anchor = first
    if profile:
        stats.extend_s = 0.0
    clock = _RoundClock()
    width = policy.next_width()
    while not emit.done:
        if width == 1:
            segment = _ar_segment(verifier, source, cache, anchor, policy, sampler, emit, clock)
            width, anchor = yield from segment
            continue
        t0 = time.perf_counter()
        anchor_arr = mx.array([anchor], dtype=mx.int32)
        position = _next_position(cache)  # the first draft's: the anchor goes in next
        drafts = source.propose(anchor_arr, width, sampler, position)
        if graph == "two-phase":
            mx.eval(drafts)
            stats.host_syncs += 1
        else:
            mx.async_eval(drafts)
        t1 = time.perf_counter()

        block = verifier.forward(mx.concatenate([anchor_arr, drafts])[None], cache)
        choice = sampler.choose(block.logits[0], position)
        accepted, emitted = accept_drafts(drafts, choice.tokens)
        unsure = choice.unsure_through(accepted)
        values = _read_round(accepted, emitted, unsure)
        stats.host_syncs += 1
        if unsure is not None and values.pop():  # a row it commits was unsure: settle it
            accepted, emitted = accept_drafts(drafts, sampler.settled(choice))
            values = _read_round(accepted, emitted)
            stats.host_syncs += 1
        n_acc = values[0]
        t2 = time.perf_counter()

        verifier.trim(cache, width - 1 - n_acc)
        source.extend(block.taps[:, : n_acc + 1])
        if profile:
            mx.eval(source.pending())
            stats.host_syncs += 1
            stats.extend_s += time.perf_counter() - t2
        else:
            mx.async_eval(source.pending())
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.blocks += 1
        stats.accepted.append(n_acc)
        stats.widths.append(width)
        policy.record(width, n_acc, clock.lap())

        tokens = values[1 : n_acc + 2]
        anchor = tokens[-1]
        yield emit.take(tokens)
        width = policy.next_width()


def collect(stream: Iterator[list[int]]) -> list[int]:
    return [t for chunk in stream for t in chunk]
