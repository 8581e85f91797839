"""The mixing recipe: how many prompts of each kind, for training and held out, in one cache.

A mix is `kind=weight,...` over `training.kinds.KINDS`. Training prompts come from the train
files and each kind's held-out prompts from the held-out files (the bench's workloads are cut
from those too, so no training prompt shares a file with them). Both sets follow the same
mix, so the held-out tau is reported per kind. The kinds are shuffled together, so a
time-bounded generation drops them alike.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from .data import HELD_OUT_PERCENT, TokenCache, find_mask_token, split_files, stdlib_root
from .kinds import KINDS, Source, code_lengths, sample_prompts

CODE_KINDS = ("excerpt", "function_body", "tail")  # cut to --min/--max-prompt-tokens


def parse_mix(text: str) -> dict[str, float]:
    """`kind=weight,...` -> shares that sum to 1 (kinds from KINDS)."""
    mix: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        if name not in KINDS:
            raise UserError(f"unknown prompt kind {name!r} (kinds: {', '.join(KINDS)})")
        try:
            mix[name] = float(weight)
        except ValueError:
            raise UserError(f"{part!r} is not kind=weight") from None
        if mix[name] < 0:
            raise UserError(f"the weight of {name} is negative")
    total = sum(mix.values())
    if total <= 0:
        raise UserError(f"the mix {text!r} has no positive weight")
    return {name: w / total for name, w in mix.items() if w > 0}


def split_counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """n prompts shared out by the mix (largest remainders), every count an integer."""
    exact = {k: n * w for k, w in mix.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def build_prompt_cache(
    tokenizer: Any,
    n_train: int,
    n_held_out: int,
    min_tokens: int,
    max_tokens: int,
    seed: int,
    mix: dict[str, float],
    mask_token_id: int | None = None,
    root: Path | None = None,
) -> TokenCache:
    """Prompts for training (train files) and evaluation (held-out files), no continuations;
    the code kinds are cut to lengths in [min_tokens, max_tokens], the others to their own."""
    if not 2 <= min_tokens <= max_tokens:
        raise UserError(f"prompt lengths need 2 <= min ({min_tokens}) <= max ({max_tokens})")
    root = root or stdlib_root()
    train_files, held_files = split_files(root)
    rng = random.Random(seed)
    sources: dict[Path, Source] = {}

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def draw(files: list[Path], n: int) -> list[tuple[list[int], str]]:
        rows = []
        for name, count in split_counts(n, mix).items():
            kind = KINDS[name]
            if name in CODE_KINDS:
                kind = replace(kind, lengths=code_lengths(min_tokens, max_tokens))
            rows += [(p, name) for p in sample_prompts(
                kind, files, encode_batch, count, rng, tokenizer.bos_token_id, sources)]
        if len(mix) > 1:
            rng.shuffle(rows)
        return rows

    rows = draw(train_files, n_train) + draw(held_files, n_held_out)
    eos = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<end_of_turn>"])}
    eos.discard(None)
    eos.discard(tokenizer.unk_token_id)
    meta = {
        "mask_token_id": find_mask_token(tokenizer) if mask_token_id is None else mask_token_id,
        "eos_ids": sorted(eos),
        "vocab_size": len(tokenizer),
        "seed": seed,
        "corpus": str(root),
        "held_out_percent": HELD_OUT_PERCENT,
        "min_prompt_tokens": min_tokens,
        "max_prompt_tokens": max_tokens,
        "mix": mix,
    }
    return TokenCache([p for p, _ in rows], [False] * n_train + [True] * n_held_out, meta,
                      kinds=[k for _, k in rows])
