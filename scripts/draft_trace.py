"""Why one prompt drafts the way it does: at every anchor of its greedy answer, the drafter's
block against what the verifier then said, and which anchors the fused loop's rounds took.

    python scripts/draft_trace.py --prompt-file mlx_engine/workloads/example_prompt.py \
        [--draft DIR] [--block-size 16] [--show 6] [--json trace.json]

Each row: the anchor (the token a round drafts from), how many of its drafts the verifier
would accept, the answer's next tokens, and the first drafts with the drafter's confidence
(x marks a miss). `*` marks the anchors where the fused loop (fixed block size) started a
round: a round commits its accepted drafts plus one token, so one early miss costs a round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlx_engine.engine import Engine, RunOptions, mx  # mx after mlx_engine: MLX behind its BLAS
from mlx_engine.errors import UserError, cli_entry
from mlx_engine.prompt_cache import common_prefix
from mlx_engine.proposer import DFlashDraftSource


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-file", type=Path, required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--draft", default="default")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--show", type=int, default=6, help="drafts shown per anchor")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    try:
        text = args.prompt_file.read_text()
    except OSError as exc:
        raise UserError(f"cannot read --prompt-file: {exc}") from None
    engine = Engine.load(args.model, args.draft)
    tok, verifier = engine.tokenizer, engine.verifier
    prompt = engine.encode(text)
    opts = RunOptions(max_tokens=args.max_tokens, block_size=args.block_size)
    answer = engine.run("ar", prompt, opts).tokens
    fused = engine.run("fused", prompt, opts)
    if fused.tokens != answer:
        raise SystemExit("error: the fused output differs from AR (a lossless bug: report it)")
    starts, s = set(), 0
    for a in fused.stats.accepted:
        starts.add(s)
        s += a + 1

    taps: list[mx.array] = []
    verifier.prefill(mx.array([prompt + answer]), verifier.make_cache(), taps.append)
    context = mx.concatenate(taps, axis=1)
    print(f"{len(prompt)} prompt tokens, answer ({len(answer)} tokens): "
          f"{tok.decode(answer)!r}; fused tau {fused.stats.mean_accept_len:.2f}")
    rows = []
    source = DFlashDraftSource(engine.drafter, verifier, engine.draft_head)
    source.extend(context[:, : len(prompt)])
    for i in range(len(answer) - 1):
        if i:  # drafting leaves the context as it was: grow it by the previous anchor's row
            source.extend(context[:, len(prompt) + i - 1 : len(prompt) + i])
        logits = source.draft_logits(mx.array([answer[i]]), args.block_size)
        choice = mx.argmax(logits, axis=-1)
        confidence = mx.softmax(logits.astype(mx.float32), axis=-1)[
            mx.arange(choice.size), choice]
        drafts = (choice if source.vocab_ids is None else source.vocab_ids[choice]).tolist()
        truth = answer[i + 1 : i + args.block_size]
        accepted = common_prefix(drafts, truth)
        rows.append({"anchor": answer[i], "accepted": accepted, "round": i in starts,
                     "drafts": drafts, "confidence": confidence.tolist()})
        shown = " ".join(
            f"{tok.decode([d])!r}{'' if k < len(truth) and d == truth[k] else 'x'}:{c:.2f}"
            for k, (d, c) in enumerate(zip(drafts, rows[-1]["confidence"], strict=True))
            if k < args.show)
        print(f"{'*' if i in starts else ' '}{i:3d} {tok.decode([answer[i]])!r:14} "
              f"accepts {accepted:2d} | next {tok.decode(truth[:4])!r:28} | {shown}")
    if args.json:
        args.json.write_text(json.dumps({"prompt": prompt, "answer": answer,
                                         "accepted": fused.stats.accepted, "anchors": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
