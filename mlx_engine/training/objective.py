"""The DFlash training objective: random anchors, masked blocks, decay-weighted CE.

Per sequence, `n_anchors` distinct anchor positions are drawn from the target's greedy
continuation (where acceptance is measured). Block g is `[token[a_g], MASK x (B-1)]` at
positions a_g..a_g+B-1, sees only the target's taps of positions < a_g, and block position
k (1..B-1) is trained to predict token[a_g + k]. Early positions matter more, since a draft
is only accepted up to its first miss: the CE of position k is weighted exp(-(k-1)/gamma)
(DFlash; gamma 7 for B=16, 5 for B=10, 4 for B=8). A block may run past the end of its
sequence, whose positions there carry no loss: answers that stop (EOS) are often shorter
than a block, and their last tokens, EOS included, are what a drafter must learn to end on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PAPER_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}
IGNORE = -100  # a label past the end of its sequence (cross_entropy's ignore_index)


def default_gamma(block_size: int) -> float:
    return PAPER_GAMMA.get(block_size, block_size * 7.0 / 16.0)


def decay_weights(block_size: int, gamma: float) -> torch.Tensor:
    """[B-1] weights of block positions k = 1..B-1: exp(-(k-1)/gamma)."""
    k = torch.arange(1, block_size, dtype=torch.float32)
    return torch.exp(-(k - 1) / gamma)


def sample_anchors(
    first: torch.Tensor,
    lengths: torch.Tensor,
    n_anchors: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [b, n], keep [b, n]): distinct anchors a with first <= a <= length - 2, so
    every block has a label (blocks may run past the end; `make_blocks` masks those labels).

    Rows with fewer candidates than n_anchors repeat their first candidate with keep=False,
    so every batch has the same static shape.
    """
    b = first.shape[0]
    anchors = torch.zeros(b, n_anchors, dtype=torch.long)
    keep = torch.zeros(b, n_anchors, dtype=torch.bool)
    for row in range(b):
        lo, hi = int(first[row]), int(lengths[row]) - 2
        count = hi - lo + 1
        if count <= 0:
            continue
        take = min(count, n_anchors)
        picked = torch.randperm(count, generator=generator)[:take] + lo
        anchors[row] = lo
        anchors[row, :take] = picked.sort().values
        keep[row, :take] = True
    return anchors, keep


def make_blocks(
    tokens: torch.Tensor,
    anchors: torch.Tensor,
    block_size: int,
    mask_token_id: int,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_ids [b, n*B], labels [b, n, B-1]) for anchors [b, n] into tokens [b, L]; labels
    at or past a row's length (default: L) are IGNORE."""
    b, n = anchors.shape
    idx = anchors[..., None] + torch.arange(block_size, device=anchors.device)
    gathered = tokens.gather(1, idx.clamp(max=tokens.shape[1] - 1).reshape(b, -1))
    gathered = gathered.view(b, n, block_size)
    block = torch.full_like(gathered, mask_token_id)
    block[..., 0] = gathered[..., 0]
    ends = (torch.full((b,), tokens.shape[1], device=tokens.device) if lengths is None
            else lengths.to(tokens.device))
    labels = gathered[..., 1:].masked_fill(idx[..., 1:] >= ends[:, None, None], IGNORE)
    return block.reshape(b, -1), labels


@dataclass
class LossStats:
    loss: float
    accuracy: list[float]  # top-1 accuracy per block position 1..B-1
    accept: float  # mean accepted drafts per block (leading matches); tau estimate = 1 + this


def dflash_loss(
    hidden: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    keep: torch.Tensor,
    weights: torch.Tensor,
    chunk_rows: int = 4096,
) -> tuple[torch.Tensor, LossStats]:
    """Decay-weighted CE over the labelled positions 1..B-1 of the kept blocks.

    hidden [b, n*B, H] is the drafter's normed output; logits are made `chunk_rows` rows at a
    time under activation checkpointing, so a 262k vocabulary never holds [rows, V] floats
    for the whole batch in memory.
    """
    b, n, width = labels.shape
    h = hidden.view(b, n, width + 1, -1)[:, :, 1:][keep]  # [kept, B-1, H]
    y = labels[keep]
    valid = y != IGNORE
    w = weights.to(hidden.device).expand_as(y) * valid
    flat_h, flat_y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    ce_parts, hit_parts = [], []
    for s in range(0, flat_h.shape[0], chunk_rows):
        ce, hit = checkpoint(
            _ce_chunk, flat_h[s : s + chunk_rows], flat_y[s : s + chunk_rows], logits_fn,
            use_reentrant=False,
        )
        ce_parts.append(ce)
        hit_parts.append(hit)
    if not ce_parts:
        zero = hidden.sum() * 0.0
        return zero, LossStats(math.nan, [math.nan] * width, math.nan)
    ce = torch.cat(ce_parts).view_as(y)
    hit = torch.cat(hit_parts).view_as(y)
    loss = (ce * w).sum() / w.sum()
    stats = LossStats(
        loss=loss.item(),
        accuracy=(hit.sum(0) / valid.sum(0)).tolist(),  # NaN where no block reaches
        accept=hit.long().cumprod(-1).sum(-1).float().mean().item(),
    )
    return loss, stats


def _ce_chunk(
    h: torch.Tensor, y: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_fn(h).float()
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(-1) == y
