"""`python -m mlx_engine.draft_vocab`: write a drafter's draft vocabulary (most frequent tokens).

Counts tokens of the code the bundled drafter was trained on (the training split of the
interpreter's standard library, never the held-out files the bench draws from), keeps the
`--size` most frequent ids, and reports how much of the held-out text they cover. The file
makes drafting cheaper (see `proposer.py`); verification, and so the output, is unchanged.
A token the file lacks can never be drafted, so `--cache` also counts the verifier's own
answers of a training token cache (its training rows): on chat requests the offline verifier
answers with tokens that stdlib code never holds.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .drafter_config import DRAFT_VOCAB_FILE
from .errors import UserError, cli_entry
from .sources import DEFAULT, resolve_drafter, resolve_model


def _count(tokenizer, files: list[Path], desc: str) -> Counter:
    counts: Counter = Counter()
    for f in tqdm(files, desc=desc, unit="file"):
        counts.update(tokenizer.encode(f.read_text(errors="replace")))
    return counts


def build(tokenizer, size: int, max_files: int,
          answers: Counter | None = None) -> tuple[list[int], float]:
    """(token ids by frequency, held-out coverage) from the stdlib train / held-out split,
    plus `answers` (token counts of the verifier's answers to training prompts)."""
    from .training.data import split_files

    train, held = split_files()
    counts = _count(tokenizer, train[:max_files], "counting") + (answers or Counter())
    ids = [t for t, _ in counts.most_common(size)]
    held_counts = _count(tokenizer, held[: max(1, max_files // 9)], "coverage")
    keep = set(ids)
    covered = sum(n for t, n in held_counts.items() if t in keep)
    return sorted(ids), covered / max(1, sum(held_counts.values()))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_engine.draft_vocab", description=__doc__)
    p.add_argument("--draft", default=DEFAULT, help="drafter dir to write into")
    p.add_argument("--model", default=DEFAULT, help="verifier whose tokenizer counts")
    p.add_argument("--size", type=int, default=32768)
    p.add_argument("--max-files", type=int, default=2000)
    p.add_argument("--cache", type=Path, nargs="+", default=[],
                   help="token caches with continuations: count the verifier's answers to "
                        "their training prompts too")
    args = p.parse_args(argv)
    if args.size < 1:
        raise UserError(f"--size must be >= 1, not {args.size}")
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(resolve_model(args.model, "float32"))
    from .training.data import TokenCache

    answers: Counter = Counter()
    for path in args.cache:
        cache = TokenCache.load(path)
        answers.update(t for i in cache.indices(held_out=False) for t in cache.continuations[i])
    ids, coverage = build(tokenizer, args.size, args.max_files, answers)
    out = resolve_drafter(args.draft) / DRAFT_VOCAB_FILE
    mx.save_safetensors(str(out), {"token_ids": mx.array(ids, dtype=mx.int32)})
    print(f"{out}: {len(ids)} tokens, covering {coverage:.2%} of held-out code tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
