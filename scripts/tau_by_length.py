"""Held-out replay tau counted over the first N tokens of each continuation: how acceptance
grows along a greedy continuation (the bench stops at 96-128 tokens, the training eval at 256).

    python scripts/tau_by_length.py --data docs/drafter/held_out_ft3.npz --n 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_engine.gguf.convert import default_verifier_dir
from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
from mlx_engine.reference.torch_target import load_target
from mlx_engine.sources import resolve_drafter
from mlx_engine.training.data import TokenCache
from mlx_engine.training.evaluate import accepted_per_anchor, round_commits

LENGTHS = (64, 96, 128, 192, 256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="token cache with continuations")
    p.add_argument("--draft", default="default")
    p.add_argument("--n", type=int, default=20, help="first N held-out function-body prompts")
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()

    cache = TokenCache.load(args.data)
    target = load_target(default_verifier_dir("float32"))
    drafter = TorchDFlashDrafter.from_pretrained(resolve_drafter(args.draft))
    totals = {n: [0, 0] for n in LENGTHS}  # rounds, tokens
    for i in cache.indices(held_out=True, kind="function_body")[: args.n]:
        prompt, cont = cache.prompts[i], cache.continuations[i]
        accepted = accepted_per_anchor(target, drafter, prompt + cont, len(prompt),
                                       args.block_size)
        for n in LENGTHS:  # the rounds whose whole block lies inside the first n tokens
            steps = round_commits(accepted, n - args.block_size + 1)
            totals[n][0] += len(steps)
            totals[n][1] += sum(steps)
    for n, (rounds, tokens) in totals.items():
        print(f"first {n:3d} tokens: tau {tokens / rounds:.2f} over {rounds} rounds")


if __name__ == "__main__":
    main()
