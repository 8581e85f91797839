"""`python -m mlx_engine.parity`: the MLX drafter must draft what the torch reference drafts.

Both drafters get the same real verifier taps (MLX verifier, fp32), the same target embedding
and head, and the same anchors along real greedy continuations of held-out code; we compare
the drafted tokens. In fp32 anything below 100% agreement is a port bug; in bf16 the
agreement is reported (rounding flips near-tied argmaxes).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import evidence
from .engine import Engine, RunOptions
from .errors import UserError, cli_entry
from .sources import DEFAULT

PARITY_DTYPES = ("float32", "bfloat16")


def _code_prompts(n: int, chars: int = 1200) -> list[str]:
    from .training.data import held_out_files

    files = held_out_files()[:n]
    return [f.read_text(errors="replace")[:chars] for f in files]


class TorchSide:
    """The torch reference drafter with the target's embedding and head as torch tensors."""

    def __init__(self, drafter_dir: Path, matrices: tuple[mx.array, mx.array], dtype: str):
        try:
            import torch
        except ImportError:
            raise UserError("parity needs torch: pip install 'kakeya-mlx[torch]'") from None
        from .reference.torch_drafter import TorchDFlashDrafter

        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.drafter = TorchDFlashDrafter.from_pretrained(drafter_dir, dtype=self.dtype).eval()
        self.embed, self.head = (self._tensor(m) for m in matrices)

    def _tensor(self, a: mx.array):
        return self.torch.from_numpy(np.array(a.astype(mx.float32))).to(self.dtype)

    def new_cache(self):
        return self.drafter.make_context_cache()

    def extend(self, taps: mx.array, cache) -> None:
        self.drafter.extend_context(self._tensor(taps), cache)

    def draft(self, block: list[int], cache) -> tuple[list[int], np.ndarray]:
        ids = self.torch.tensor([block])
        logits = self.drafter.draft_logits(ids, cache, lambda i: self.embed[i],
                                           lambda h: h @ self.head.T)[0].float()
        return logits.argmax(-1).tolist(), logits.numpy()


class MLXSide:
    def __init__(self, engine: Engine, matrices: tuple[mx.array, mx.array], dtype: str):
        self.engine = engine
        self.dtype = getattr(mx, dtype)
        engine.drafter.set_dtype(self.dtype)
        self.embed, self.head = (m.astype(self.dtype) for m in matrices)

    def new_cache(self):
        return self.engine.drafter.make_context_cache()

    def extend(self, taps: mx.array, cache) -> None:
        self.engine.drafter.extend_context(taps.astype(self.dtype), cache)

    def draft(self, block: list[int], cache) -> tuple[list[int], np.ndarray]:
        logits = self.engine.drafter.draft_logits(
            mx.array([block]), cache, lambda i: self.embed[i], lambda h: h @ self.head.T
        )[0].astype(mx.float32)
        return mx.argmax(logits, axis=-1).tolist(), np.array(logits)


def compare(engine: Engine, torch_side: TorchSide, mlx_side: MLXSide, prompts: list[list[int]],
            new_tokens: int, stride: int) -> dict[str, Any]:
    """Draft at every `stride`-th position of each AR continuation with both drafters."""
    cfg = engine.drafter.config
    block_size, mask = cfg.block_size, cfg.mask_token_id
    same = total = blocks_same = blocks = 0
    max_diff = 0.0
    for prompt in prompts:
        tokens = prompt + engine.run("ar", prompt, RunOptions(max_tokens=new_tokens,
                                                              ignore_eos=True)).tokens
        cache = engine.verifier.make_cache()
        taps = engine.verifier.forward(mx.array([tokens]), cache).taps
        mx.eval(taps)
        caches = (mlx_side.new_cache(), torch_side.new_cache())
        done = 0
        for start in range(len(prompt), len(tokens), stride):
            for side, c in zip((mlx_side, torch_side), caches, strict=True):
                side.extend(taps[:, done:start], c)
            done = start
            block = [tokens[start]] + [mask] * (block_size - 1)
            a, la = mlx_side.draft(block, caches[0])
            b, lb = torch_side.draft(block, caches[1])
            matches = sum(x == y for x, y in zip(a, b, strict=True))
            same, total = same + matches, total + len(a)
            blocks_same, blocks = blocks_same + (matches == len(a)), blocks + 1
            max_diff = max(max_diff, float(np.abs(la - lb).max()))
    return {"agreement": same / total, "blocks_identical": blocks_same / blocks,
            "positions": total, "blocks": blocks, "max_abs_logit_diff": max_diff}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_engine.parity", description=__doc__)
    p.add_argument("--draft", default=DEFAULT, help="drafter dir (default: bundled)")
    p.add_argument("--model", default=DEFAULT, help="verifier (default: offline Gemma 3 270M)")
    p.add_argument("--dtype", choices=PARITY_DTYPES, default="float32",
                   help="dtype both drafters run in (taps always come from an fp32 verifier)")
    p.add_argument("--n", type=int, default=4, help="held-out code prompts")
    p.add_argument("--new-tokens", type=int, default=64, help="AR continuation per prompt")
    p.add_argument("--stride", type=int, default=4, help="draft at every k-th position")
    p.add_argument("--json", type=Path, default=None)
    return p


@cli_entry
def main(argv: list[str] | None = None, prompts: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.new_tokens < 1 or args.stride < 1:
        raise UserError("--n, --new-tokens and --stride must be >= 1")
    engine = Engine.load(args.model, args.draft, "float32")
    matrices = engine.verifier.dense_matrices()  # the target's embedding and head, once
    torch_side = TorchSide(engine.drafter_info.path, matrices, args.dtype)
    mlx_side = MLXSide(engine, matrices, args.dtype)
    texts = prompts if prompts is not None else _code_prompts(args.n)
    ids = [engine.encode(t, chat_template=False) for t in texts[: args.n]]
    result = compare(engine, torch_side, mlx_side, ids, args.new_tokens, args.stride)
    result["passed"] = result["agreement"] == 1.0 if args.dtype == "float32" else None
    print(f"[{args.dtype}] agreement {result['agreement']:.4%} over {result['positions']} "
          f"drafted positions | blocks identical {result['blocks_identical']:.2%} | "
          f"max |logit diff| {result['max_abs_logit_diff']:.3g}")
    if args.json is not None:
        params = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        command = shlex.join(["python", "-m", __spec__.name, *(argv or sys.argv[1:])])
        evidence.write(evidence.parity_record(engine, params, result, command), args.json)
    return 0 if result["passed"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
