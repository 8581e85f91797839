"""Token choice and draft acceptance, all in-graph so a block costs one host read-back.

Every sampler decodes greedily, over scores: the logits themselves (greedy), or, with a
temperature, the Gumbel-max trick's perturbed scores. Position t's token is then
argmax(logits_t / temp + g_t), an exact sample of softmax(logits_t / temp) (top-k / top-p
first set the tokens they leave out to -inf), where the noise g_t is drawn from a key made of
the run's seed and t alone. The drafter drafts the argmax of its own scores plus the same
g_t, and the verifier keeps the longest run of drafts equal to its own tokens. So a sampled
fused run writes exactly the tokens a sampled AR run with the same seed writes, whatever the
widths and whatever the drafter: losslessness is checked token for token, and the width
policy and its shadow drafts work as under greedy decoding. Against Leviathan et al.'s
rejection sampling, which keeps the target's distribution but not AR's sample, a draft is
accepted slightly less often: the shared noise couples the drafter's sample with the target's
less tightly than a maximal coupling does (docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def kind(self) -> str:
        """What a round costs depends on this, not on the values: the width policy measures
        round costs and acceptance per kind."""
        if self.greedy:
            return "greedy"
        cuts = [name for name, on in (("top-k", self.top_k > 0), ("top-p", self.top_p < 1))
                if on]
        return "+".join(["sampled", *cuts])


def filtered(logits: mx.array, params: SamplingParams) -> mx.array:
    """Logits / temp, with the tokens top-k and top-p leave out at -inf (last axis)."""
    scores = logits.astype(mx.float32) / params.temp
    if 0 < params.top_k < scores.shape[-1]:
        kth = mx.topk(scores, params.top_k, axis=-1).min(axis=-1, keepdims=True)
        scores = mx.where(scores >= kth, scores, -mx.inf)
    if params.top_p < 1.0:  # the most likely tokens until their mass reaches top_p
        p = mx.softmax(scores, axis=-1)
        sorted_p = -mx.sort(-p, axis=-1)  # values only: a fifth cheaper than argsort on a CPU
        kept = ((mx.cumsum(sorted_p, axis=-1) - sorted_p) < params.top_p).sum(-1, keepdims=True)
        least = mx.take_along_axis(sorted_p, kept - 1, axis=-1)  # the last kept token's p
        scores = mx.where(p >= least, scores, -mx.inf)  # (a tie with it is kept too)
    return scores


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """The sampling distribution over the last axis after temperature, top-k and top-p."""
    return mx.softmax(filtered(logits, params), axis=-1)


def greedy_accept(drafts: mx.array, target_scores: mx.array) -> tuple[mx.array, mx.array]:
    """drafts [B-1], target_scores [B, V] -> (accepted count, emitted [B]): the longest run
    of drafts equal to the target's argmax, then the target's own token (rest is padding)."""
    target = mx.argmax(target_scores, axis=-1)
    accepted = mx.cumprod((drafts == target[:-1]).astype(mx.int32)).sum()
    padded = mx.concatenate([drafts, mx.zeros((1,), drafts.dtype)])
    idx = mx.arange(padded.shape[0])
    emitted = mx.where(idx < accepted, padded, mx.take(target, accepted).astype(drafts.dtype))
    return accepted, emitted


class Sampler:
    """Chooses tokens as the argmax of `scores`; this base scores by the logits themselves,
    which is exactly plain greedy decoding. A sampler is one method, `scores`.

    `position` is the sequence index of the token a row of logits chooses (rows after the
    first choose the next positions); `vocab_ids` maps a draft vocabulary's columns to
    token ids."""

    def scores(self, logits: mx.array, position: int,
               vocab_ids: mx.array | None = None) -> mx.array:
        return logits

    def pick(self, logits: mx.array, position: int) -> mx.array:
        """The token at `position` from target logits [V]."""
        return mx.argmax(self.scores(logits, position), axis=-1)

    def draft(self, logits: mx.array, position: int,
              vocab_ids: mx.array | None = None) -> mx.array:
        """Draft columns [B-1] from drafter logits [B-1, V'] for positions from `position`."""
        return mx.argmax(self.scores(logits, position, vocab_ids), axis=-1)

    def accept(self, drafts: mx.array, target_logits: mx.array,
               position: int) -> tuple[mx.array, mx.array]:
        """(accepted count, emitted [B]) for drafts [B-1] against target logits [B, V] whose
        first row chooses `position` (the first draft's)."""
        return greedy_accept(drafts, self.scores(target_logits, position))


class GumbelMax(Sampler):
    """Samples with temperature / top-k / top-p as argmax of scores plus noise drawn per
    (seed, position): fused and AR decoding then sample the same tokens."""

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int):
        self.params, self.seed, self.vocab_size = params, seed % 2**32, vocab_size
        self._noise: dict[int, mx.array] = {}

    def noise(self, position: int, rows: int) -> mx.array:
        """[rows, V] noise for positions `position`... A row is drawn once and kept until an
        earlier position is asked for no more: a round verifies again what the last one
        rejected, and the drafter and the verifier share a round's rows."""
        for done in [t for t in self._noise if t < position]:
            del self._noise[done]
        for t in range(position, position + rows):
            if t not in self._noise:
                key = mx.random.key((self.seed << 32) | t)
                self._noise[t] = mx.random.gumbel(shape=(self.vocab_size,), key=key)
        return mx.stack([self._noise[t] for t in range(position, position + rows)])

    def scores(self, logits: mx.array, position: int,
               vocab_ids: mx.array | None = None) -> mx.array:
        rows = logits.reshape(-1, logits.shape[-1])
        noise = self.noise(position, rows.shape[0])
        if vocab_ids is not None:
            noise = mx.take(noise, vocab_ids, axis=1)
        return (filtered(rows, self.params) + noise).reshape(logits.shape)


GREEDY = Sampler()


def make_sampler(params: SamplingParams, seed: int | None, vocab_size: int) -> Sampler:
    """Greedy, or Gumbel-max sampling under `seed` (None: 0) over `vocab_size` tokens."""
    return GREEDY if params.greedy else GumbelMax(params, seed or 0, vocab_size)
