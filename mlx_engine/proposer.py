"""A drafter bound to one verifier and one sequence: what the fused loop asks for drafts.

The drafter's output head is the target's. Over Gemma's 262k vocabulary, scoring B-1 block
positions costs as much as the verifier's own head, so a drafter dir may ship a draft
vocabulary (`draft_vocab.safetensors`: the most frequent target tokens): drafts are then
chosen among those rows only. Verification still scores the full vocabulary, so output is
unchanged; only drafts outside the subset become impossible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .drafter import DFlashDrafter
from .drafter_config import DRAFT_VOCAB_FILE
from .errors import UserError
from .sampling import Sampler
from .verifier import Verifier


class DraftSource(Protocol):
    """What the loop needs from a drafter; tests wrap it to force acceptance counts."""

    def extend(self, taps: mx.array) -> None: ...

    def propose(self, anchor: mx.array, block_size: int, sampler: Sampler,
                position: int) -> mx.array: ...

    def pending(self) -> list[mx.array]: ...


class DraftHead:
    """The target's output head as the drafter uses it: full, or gathered to a draft vocab.

    Built once per engine (gathering 32k rows of a 262k head is not free) and shared by
    every sequence's source.
    """

    def __init__(self, verifier: Verifier, vocab_ids: mx.array | None = None):
        self.vocab_ids = vocab_ids
        self.project = (verifier.raw_head if vocab_ids is None
                        else verifier.raw_head_rows(vocab_ids))


def load_draft_vocab(path: Path, vocab_size: int) -> mx.array | None:
    """The drafter dir's `draft_vocab.safetensors` token ids, if it ships one."""
    file = path / DRAFT_VOCAB_FILE
    if not file.is_file():
        return None
    try:
        ids = mx.load(str(file))["token_ids"].astype(mx.int32)
    except Exception as exc:
        raise UserError(f"cannot read draft vocabulary {file}: {exc}") from None
    if ids.ndim != 1 or ids.size == 0 or int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise UserError(f"draft vocabulary {file} must hold token ids in [0, {vocab_size})")
    return ids


class DFlashDraftSource:
    """Context cache + drafting for one sequence."""

    def __init__(self, drafter: DFlashDrafter, verifier: Verifier,
                 head: DraftHead | None = None, cache: list[KVCache] | None = None):
        """`cache`: context rows of an earlier sequence's prefix to continue from."""
        self.drafter = drafter
        self.verifier = verifier
        self.cache: list[KVCache] = drafter.make_context_cache() if cache is None else cache
        cfg = drafter.config
        self.masks = mx.full((cfg.block_size - 1,), cfg.mask_token_id, dtype=mx.int32)
        head = head or DraftHead(verifier)
        self.vocab_ids, self.head = head.vocab_ids, head.project

    @property
    def context_len(self) -> int:
        return self.cache[0].offset

    def extend(self, taps: mx.array) -> None:
        self.drafter.extend_context(taps, self.cache)

    def draft_logits(self, anchor: mx.array, block_size: int) -> mx.array:
        """[block_size-1, V'] logits, V' = the draft vocabulary's size (the full vocab without
        one). The drafter always sees its trained block (anchor + B-1 mask tokens): its block
        attends both ways, so a narrower block would be an input it never saw and draft
        worse; a narrow round verifies the first drafts of the full block."""
        ids = mx.concatenate([anchor.astype(mx.int32), self.masks])
        return self.drafter.draft_logits(ids[None], self.cache, self.verifier.embed,
                                         self.head, drafts=block_size - 1)[0]

    def propose(self, anchor: mx.array, block_size: int, sampler: Sampler,
                position: int) -> mx.array:
        """Draft tokens [B-1] for the positions from `position` (the anchor's next)."""
        choice = sampler.draft(self.draft_logits(anchor, block_size), position, self.vocab_ids)
        if self.vocab_ids is None:
            return choice.astype(mx.int32)
        return self.vocab_ids[choice].astype(mx.int32)

    def pending(self) -> list[mx.array]:
        return [a for c in self.cache for a in (c.keys, c.values)]
