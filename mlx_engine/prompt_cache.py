"""The KV rows of the last sequence, kept for the next request that repeats its start.

A chat client re-sends the whole conversation every turn, so without this each turn prefills
everything before it again. Reuse is exact: the verifier's cache is a plain `KVCache` on every
layer, sliding-window layers included (`verifier.py`), and the drafter's context rows are one
per position, so rolling both back to the longest common token prefix is a trim, and the rows
kept are the rows a cold run would compute for those tokens. Past the first differing token
nothing is reused. A recurrent layer's state (`RecurrentCache`) cannot be cut back to any
prefix: with one, the rows are reused when the new prompt starts with all of them, or else up
to the end of the previous prompt, where the engine marked the states (a chat template that
renders the last answer differently, e.g. without its reasoning, still reuses everything
before it). One slot: one model serves one conversation at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models.cache import KVCache

from .verifier import RecurrentCache, can_cut, longest_cut


@dataclass
class CachedRows:
    tokens: list[int]  # the tokens the rows hold, in order
    verifier: list[KVCache | RecurrentCache]
    drafter: list[KVCache] | None  # the drafter's context rows (after a fused run)


def _keep(cache: list[KVCache | RecurrentCache], n: int) -> bool:
    """Cut every layer's rows to the first `n`; False, and nothing cut, where a recurrent
    state cannot drop that many."""
    if not can_cut(cache, n):
        return False
    for c in cache:
        c.trim(c.offset - n)
    return True


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two token lists share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


class PromptCache:
    def __init__(self) -> None:
        self._rows: CachedRows | None = None

    def take(self, prompt: list[int], with_drafter: bool) -> CachedRows | None:
        """The cached rows cut to the longest prefix they share with `prompt` (never all of
        it: the last prompt token is prefilled for its logits), or None. Taking empties the
        slot: the run extends the rows in place."""
        rows, self._rows = self._rows, None
        if rows is None or (with_drafter and rows.drafter is None):
            return None
        n = longest_cut(rows.verifier, common_prefix(rows.tokens, prompt[:-1]))
        if n == 0:
            return None
        _keep(rows.verifier, n)
        if with_drafter:
            _keep(rows.drafter, n)
        return CachedRows(rows.tokens[:n], rows.verifier, rows.drafter if with_drafter else None)

    def put(self, tokens: list[int], verifier: list[KVCache | RecurrentCache],
            drafter: list[KVCache] | None) -> None:
        """Keep a finished (or abandoned) run's rows. A run's cache may hold rows past the
        tokens it returned (drafts accepted beyond max_tokens or a stop): they are cut, or
        nothing is kept where a recurrent state cannot drop them."""
        n = min(len(tokens), verifier[0].offset,
                len(tokens) if drafter is None else drafter[0].offset)
        self._rows = None
        if not _keep(verifier, n):
            return
        if drafter is not None:
            _keep(drafter, n)
        self._rows = CachedRows(tokens[:n], verifier, drafter)
