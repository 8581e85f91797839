"""Held-out acceptance length tau, by exact simulation of greedy DFlash decoding.

Under greedy verification the committed text IS the target's greedy continuation, so every
round of speculative decoding can be replayed from that continuation alone: the round at
anchor s drafts from the taps of positions < s, accepts the a leading drafts that match the
continuation, commits a + 1 tokens (the bonus is the target's own next token), and the next
round anchors at s + a + 1. Drafting every possible anchor in a few batched forwards and
then walking the rounds gives the same tau as running the loop, without the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..reference.torch_drafter import TorchDFlashDrafter
from ..reference.torch_target import TargetModel
from .objective import make_blocks


@torch.no_grad()
def accepted_per_anchor(
    target: TargetModel,
    drafter: TorchDFlashDrafter,
    tokens: list[int],
    first: int,
    block_size: int,
    anchors_per_pass: int = 64,
) -> list[int]:
    """Leading drafts matching `tokens` for each anchor first..len(tokens)-block_size."""
    cfg = drafter.config
    ids = torch.tensor([tokens], device=target.device)
    taps = target.taps(ids, cfg.target_layer_ids)
    accepted: list[int] = []
    for lo in range(first, len(tokens) - block_size + 1, anchors_per_pass):
        hi = min(lo + anchors_per_pass, len(tokens) - block_size + 1)
        anchors = torch.arange(lo, hi, device=target.device)[None]
        block_ids, labels = make_blocks(ids, anchors, block_size, cfg.mask_token_id)
        embeds = target.embed(block_ids) * cfg.input_embedding_scale
        hidden = drafter(taps, embeds, anchors).view(1, hi - lo, block_size, -1)[:, :, 1:]
        drafts = drafter.compute_logits(hidden, target.head).argmax(-1)
        accepted += (drafts == labels).long().cumprod(-1).sum(-1)[0].tolist()
    return accepted


def round_commits(accepted: Sequence[int], anchors: int | None = None) -> list[int]:
    """Tokens committed by each round of the replayed loop: the round at anchor s commits its
    accepted drafts + the bonus token and the next anchors after them. Rounds start at the
    first `anchors` anchors (default: every anchor with a whole block inside the text)."""
    end = len(accepted) if anchors is None else min(anchors, len(accepted))
    steps: list[int] = []
    s = 0
    while s < end:
        steps.append(accepted[s] + 1)
        s += steps[-1]
    return steps


def acceptance_length(
    target: TargetModel,
    drafter: TorchDFlashDrafter,
    prompts: Sequence[list[int]],
    continuations: Sequence[list[int]],
    block_size: int,
) -> dict[str, Any]:
    """tau = committed tokens per verify round over all full rounds of all sequences."""
    rounds = produced = 0
    for prompt, cont in zip(prompts, continuations, strict=True):
        steps = round_commits(accepted_per_anchor(target, drafter, prompt + cont, len(prompt),
                                                  block_size))
        rounds += len(steps)
        produced += sum(steps)
    return {"block_size": block_size, **replay_totals(rounds, produced, len(prompts))}


def pooled(replays: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several replays as one (ranks' shares, prompt kinds): their totals and their tau."""
    return replay_totals(*(sum(r[k] for r in replays) for k in ("rounds", "tokens", "sequences")))


def replay_totals(rounds: int, tokens: int, sequences: int) -> dict[str, Any]:
    return {"tau": tokens / rounds if rounds else float("nan"), "rounds": rounds,
            "tokens": tokens, "sequences": sequences}
