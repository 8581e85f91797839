"""Token choice and draft acceptance, all in-graph so a block costs one host read-back.

A `Sampler` is the one seam between a sampling method and the decoding loops: the loops ask it
for the next token (`pick`), the proposer for drafts (`draft`), the fused loop for the verdict
on them (`accept`); a new method is a new Sampler, nothing else changes.

Greedy acceptance keeps the longest prefix of drafts that equal the target's argmax and adds
the target's token after it; output is then exactly plain greedy decoding. With temperature,
Leviathan et al.'s rejection sampling keeps each draft with probability min(1, p/q) and
resamples a rejected position from max(p - q, 0): emitted tokens follow the target's
distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from .errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temp < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("need --temp >= 0, 0 < --top-p <= 1 and --top-k >= 0")

    @property
    def greedy(self) -> bool:
        return self.temp == 0


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Sampling distribution over the last axis after temperature, top-k and top-p."""
    scores = logits.astype(mx.float32) / params.temp
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(scores, axis=-1)[..., vocab - params.top_k][..., None]
        scores = mx.where(scores >= kth, scores, -mx.inf)
    p = mx.softmax(scores, axis=-1)
    if params.top_p < 1.0:
        order = mx.argsort(-p, axis=-1)
        sorted_p = mx.take_along_axis(p, order, axis=-1)
        keep_sorted = (mx.cumsum(sorted_p, axis=-1) - sorted_p) < params.top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        p = mx.where(keep, p, 0.0)
        p = p / p.sum(axis=-1, keepdims=True)
    return p


def draw(p: mx.array, key: mx.array) -> mx.array:
    """One token per row of a probability matrix."""
    return mx.random.categorical(mx.log(p), axis=-1, key=key)


def _emitted(drafts: mx.array, accepted: mx.array, bonus: mx.array) -> mx.array:
    """[B] row: accepted drafts, then the bonus at index `accepted` (rest is padding)."""
    padded = mx.concatenate([drafts, mx.zeros((1,), drafts.dtype)])
    idx = mx.arange(padded.shape[0])
    return mx.where(idx < accepted, padded, bonus.astype(drafts.dtype))


def greedy_accept(drafts: mx.array, target_logits: mx.array) -> tuple[mx.array, mx.array]:
    """drafts [B-1], target_logits [B, V] -> (accepted count, emitted [B])."""
    target = mx.argmax(target_logits, axis=-1)
    accepted = mx.cumprod((drafts == target[:-1]).astype(mx.int32)).sum()
    return accepted, _emitted(drafts, accepted, mx.take(target, accepted))


def rejection_accept(
    drafts: mx.array,
    draft_p: mx.array,
    target_p: mx.array,
    key: mx.array,
) -> tuple[mx.array, mx.array]:
    """Leviathan acceptance: drafts [B-1] ~ draft_p [B-1, V]; target_p [B, V]."""
    k_accept, k_bonus = mx.random.split(key)
    rows = drafts[:, None]
    p = mx.take_along_axis(target_p[:-1], rows, axis=-1)[:, 0]
    q = mx.take_along_axis(draft_p, rows, axis=-1)[:, 0]
    u = mx.random.uniform(shape=p.shape, key=k_accept)
    accepted = mx.cumprod((u * q < p).astype(mx.int32)).sum()
    residual = mx.maximum(target_p[:-1] - draft_p, 0.0)
    total = residual.sum(axis=-1, keepdims=True)
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), target_p[:-1])
    choices = mx.concatenate([residual, target_p[-1:]], axis=0)
    bonus = draw(mx.take(choices, accepted, axis=0), k_bonus)
    return accepted, _emitted(drafts, accepted, bonus)


class Sampler(Protocol):
    def pick(self, logits: mx.array, key: mx.array) -> mx.array:
        """The next token(s) from target logits [..., V]."""
        ...

    def draft(self, logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array | None]:
        """Draft tokens from drafter logits [B-1, V'], and their distribution if `accept`
        needs it."""
        ...

    def accept(self, drafts: mx.array, draft_p: mx.array | None, target_logits: mx.array,
               key: mx.array) -> tuple[mx.array, mx.array]:
        """(accepted count, emitted [B]) for drafts [B-1] against target logits [B, V]."""
        ...


class Greedy:
    """Argmax everywhere: output is exactly plain greedy decoding."""

    def pick(self, logits: mx.array, key: mx.array) -> mx.array:
        return mx.argmax(logits, axis=-1)

    def draft(self, logits: mx.array, key: mx.array) -> tuple[mx.array, None]:
        return mx.argmax(logits, axis=-1), None

    def accept(self, drafts: mx.array, draft_p: mx.array | None, target_logits: mx.array,
               key: mx.array) -> tuple[mx.array, mx.array]:
        return greedy_accept(drafts, target_logits)


@dataclass(frozen=True)
class Rejection:
    """Draws from temperature / top-k / top-p distributions; rejection sampling keeps the
    target's distribution exact."""

    params: SamplingParams

    def pick(self, logits: mx.array, key: mx.array) -> mx.array:
        return draw(probs(logits, self.params), key)

    def draft(self, logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        p = probs(logits, self.params)
        return draw(p, key), p

    def accept(self, drafts: mx.array, draft_p: mx.array | None, target_logits: mx.array,
               key: mx.array) -> tuple[mx.array, mx.array]:
        if draft_p is None:
            raise ValueError("rejection sampling needs the drafts' distribution")
        return rejection_accept(drafts, draft_p, probs(target_logits, self.params), key)


GREEDY = Greedy()


def make_sampler(params: SamplingParams) -> Sampler:
    return GREEDY if params.greedy else Rejection(params)
