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

Top-p is defined by a sort of the whole row (`filtered`), which on a CPU costs about five times
the rest of a sampled row. So rows are chosen by `top_p_choice`, which sorts only the most likely
candidates and otherwise tests the noisy argmax itself; a row it cannot settle that way (rare)
is marked unsure, and the loops choose it again by the sort (`Sampler.settled`) before they
commit it. Either way a row gets the sort's token.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .errors import UserError

TOP_CANDIDATES = 1024  # sorted by `top_p_choice`: most top-p sets at temperature <= 1 fit
CHAIN = 2  # noisy argmaxes `top_p_choice` tests when the set is larger


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


def scaled(logits: mx.array, params: SamplingParams) -> mx.array:
    """Logits / temp, with the tokens top-k leaves out at -inf (last axis)."""
    scores = logits.astype(mx.float32) / params.temp
    if 0 < params.top_k < scores.shape[-1]:
        kth = mx.topk(scores, params.top_k, axis=-1).min(axis=-1, keepdims=True)
        scores = mx.where(scores >= kth, scores, -mx.inf)
    return scores


def least_kept(descending: mx.array, top_p: float) -> tuple[mx.array, mx.array]:
    """(how many, the last one's p) of probabilities sorted most likely first that top-p
    keeps: each while the mass before it is below top_p."""
    kept = ((mx.cumsum(descending, axis=-1) - descending) < top_p).sum(-1, keepdims=True)
    return kept, mx.take_along_axis(descending, kept - 1, axis=-1)


def filtered(logits: mx.array, params: SamplingParams) -> mx.array:
    """Logits / temp, with the tokens top-k and top-p leave out at -inf (last axis)."""
    scores = scaled(logits, params)
    if params.top_p < 1.0:  # the most likely tokens until their mass reaches top_p
        p = mx.softmax(scores, axis=-1)
        # values only: a fifth cheaper than argsort on a CPU
        _, least = least_kept(-mx.sort(-p, axis=-1), params.top_p)
        scores = mx.where(p >= least, scores, -mx.inf)  # (a tie with it is kept too)
    return scores


def top_p_choice(scores: mx.array, noise: mx.array, top_p: float,
                 candidates: int = TOP_CANDIDATES,
                 chain: int = CHAIN) -> tuple[mx.array, mx.array]:
    """(argmax of scores + noise over the top-p set, sure) per row, without sorting the row.

    The set is every token at least as likely as its least likely member. If the `candidates`
    most likely tokens reach `top_p`, sorting them finds that member as the full sort does
    (same values, same running sums). A larger set holds at least `top_p` of the mass, so the
    noisy argmax over all tokens is likely in it: it is if the tokens more likely than it
    weigh less than `top_p` (one masked sum), and then it is the answer. If not, every token
    as unlikely is out too, and the argmax over the more likely ones is tested next, up to
    `chain` times. A row neither route settles is not `sure`."""
    z = scores + noise
    p = mx.softmax(scores, axis=-1)
    k = min(candidates, p.shape[-1])
    kept, least = least_kept(-mx.sort(-mx.topk(p, k, axis=-1), axis=-1), top_p)
    tokens = mx.argmax(mx.where(p >= least, z, -mx.inf), axis=-1)
    sure = (kept[..., 0] < k) | (k == p.shape[-1])
    floor = mx.full(least.shape, -1.0)
    for _ in range(chain):
        best = mx.argmax(mx.where(p > floor, z, -mx.inf), axis=-1, keepdims=True)
        p_best = mx.take_along_axis(p, best, axis=-1)
        in_set = mx.where(p > p_best, p, 0).sum(-1, keepdims=True) < top_p
        tokens = mx.where(~sure & in_set[..., 0], best[..., 0], tokens)
        sure = sure | in_set[..., 0]
        floor = mx.where(in_set, floor, p_best)
    return tokens, sure


@dataclass
class Choice:
    """Tokens chosen in-graph for rows of logits, and which rows a fast filter is `sure` of
    (None: all); `Sampler.settled` chooses the others again from the kept logits."""

    tokens: mx.array  # [rows]
    logits: mx.array  # [rows, V]
    position: int  # the first row's
    sure: mx.array | None = None  # [rows] bool

    def arrays(self) -> list[mx.array]:
        """What to queue for evaluation."""
        return [self.tokens] if self.sure is None else [self.tokens, self.sure]

    def unsure_through(self, row: mx.array) -> mx.array | None:
        """Whether a row up to `row` (in-graph) is unsure; None if all rows are sure."""
        if self.sure is None:
            return None
        return (~self.sure & (mx.arange(self.sure.shape[0]) <= row)).any()


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """The sampling distribution over the last axis after temperature, top-k and top-p."""
    return mx.softmax(filtered(logits, params), axis=-1)


def accept_drafts(drafts: mx.array, target: mx.array) -> tuple[mx.array, mx.array]:
    """drafts [B-1], the target's tokens [B] -> (accepted count, emitted [B]): the longest
    run of drafts equal to the target's, then the target's own token (rest is padding)."""
    accepted = mx.cumprod((drafts == target[:-1]).astype(mx.int32)).sum()
    padded = mx.concatenate([drafts, mx.zeros((1,), drafts.dtype)])
    idx = mx.arange(padded.shape[0])
    emitted = mx.where(idx < accepted, padded, mx.take(target, accepted).astype(drafts.dtype))
    return accepted, emitted


class Sampler:
    """Chooses tokens as the argmax of `scores`; this base scores by the logits themselves,
    which is exactly plain greedy decoding.

    `position` is the sequence index of the token a row of logits chooses (rows after the
    first choose the next positions); `vocab_ids` maps a draft vocabulary's columns to
    token ids."""

    def scores(self, logits: mx.array, position: int,
               vocab_ids: mx.array | None = None) -> mx.array:
        return logits

    def choose(self, logits: mx.array, position: int) -> Choice:
        """Tokens for target logits [rows, V] whose first row chooses `position`."""
        return Choice(mx.argmax(self.scores(logits, position), axis=-1), logits, position)

    def settled(self, choice: Choice) -> mx.array:
        """`choice`'s tokens, its unsure rows chosen again by the full filter."""
        if choice.sure is None:
            return choice.tokens
        exact = mx.argmax(self.scores(choice.logits, choice.position), axis=-1)
        return mx.where(choice.sure, choice.tokens, exact)

    def read(self, choice: Choice) -> tuple[list[int], bool]:
        """`choice`'s tokens, settled (one read, a second if a row was unsure), and whether
        they are the tokens chosen in-graph: if not, a graph built on those is wrong."""
        if choice.sure is None:
            return choice.tokens.tolist(), True
        tokens, sure = mx.stack([choice.tokens, choice.sure.astype(choice.tokens.dtype)]).tolist()
        if all(sure):
            return tokens, True
        settled = self.settled(choice).tolist()
        return settled, settled == tokens

    def draft(self, logits: mx.array, position: int,
              vocab_ids: mx.array | None = None) -> mx.array:
        """Draft columns [B-1] from drafter logits [B-1, V'] for positions from `position`."""
        return mx.argmax(self.scores(logits, position, vocab_ids), axis=-1)


class GumbelMax(Sampler):
    """Samples with temperature / top-k / top-p as argmax of scores plus noise drawn per
    (seed, position): fused and AR decoding then sample the same tokens."""

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int,
                 candidates: int = TOP_CANDIDATES, chain: int = CHAIN):
        self.params, self.seed, self.vocab_size = params, seed % 2**32, vocab_size
        self.candidates, self.chain = candidates, chain  # `top_p_choice`'s
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

    def _noise_for(self, rows: mx.array, position: int,
                   vocab_ids: mx.array | None) -> mx.array:
        noise = self.noise(position, rows.shape[0])
        return noise if vocab_ids is None else mx.take(noise, vocab_ids, axis=1)

    def scores(self, logits: mx.array, position: int,
               vocab_ids: mx.array | None = None) -> mx.array:
        rows = logits.reshape(-1, logits.shape[-1])
        noise = self._noise_for(rows, position, vocab_ids)
        return (filtered(rows, self.params) + noise).reshape(logits.shape)

    def _fast(self, logits: mx.array, position: int,
              vocab_ids: mx.array | None) -> tuple[mx.array, mx.array] | None:
        """`top_p_choice` over the rows, or None where top-p is off (no sort to spare)."""
        if self.params.top_p >= 1.0:
            return None
        rows = logits.reshape(-1, logits.shape[-1])
        tokens, sure = top_p_choice(scaled(rows, self.params),
                                    self._noise_for(rows, position, vocab_ids),
                                    self.params.top_p, self.candidates, self.chain)
        return tokens.reshape(logits.shape[:-1]), sure.reshape(logits.shape[:-1])

    def choose(self, logits: mx.array, position: int) -> Choice:
        fast = self._fast(logits, position, None)
        if fast is None:
            return super().choose(logits, position)
        return Choice(fast[0], logits, position, fast[1])

    def draft(self, logits: mx.array, position: int,
              vocab_ids: mx.array | None = None) -> mx.array:
        """A draft needs no `sure`: the verifier checks it anyway."""
        fast = self._fast(logits, position, vocab_ids)
        return super().draft(logits, position, vocab_ids) if fast is None else fast[0]


GREEDY = Sampler()


def make_sampler(params: SamplingParams, seed: int | None, vocab_size: int) -> Sampler:
    """Greedy, or Gumbel-max sampling under `seed` (None: 0) over `vocab_size` tokens."""
    return GREEDY if params.greedy else GumbelMax(params, seed or 0, vocab_size)
