"""How often top-p's fast route (`sampling.top_p_choice`) settles a row without the full sort,
and whether every row it settles gets the sort's token, on real verifier rows.

    python scripts/top_p_settles.py [--workloads chat prose] [--n 4] [--max-tokens 48] \
        [--temps 0.7 1.0 1.5] [--top-ps 0.5 0.9 0.95 0.99] [--draws 2] [--json F]

The rows are the verifier's logits along its own sampled answers (temperature 0.9, top-p
0.95) to the first N prompts of each workload; each (temperature, top-p) is then tried on
every row under `--draws` noise draws. A row the route is unsure of costs a sort and, in an AR
loop, maybe the step queued after it; a row it is sure of but gives another token than the
sort's would mean the route is not top-p as defined, so the script exits 1 on any.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_engine import workloads
from mlx_engine.engine import Engine, RunOptions, mx  # mx after mlx_engine: MLX behind its BLAS
from mlx_engine.errors import cli_entry
from mlx_engine.sampling import SamplingParams, filtered, top_p_choice

ANSWERS = SamplingParams(temp=0.9, top_p=0.95)
CHUNK = 32  # rows filtered at once


def answer_rows(engine: Engine, names: list[str], n: int, max_tokens: int) -> mx.array:
    """[rows, V]: the logits that chose each token of sampled answers (seed = prompt index)."""
    rows = []
    for name in names:
        for i, prompt in enumerate(workloads.load(name)[:n]):
            tokens = workloads.encode(engine, prompt)
            opts = RunOptions(max_tokens, sampling=ANSWERS, seed=i)
            answer = engine.run("ar", tokens, opts).tokens
            full = mx.array([tokens + answer], dtype=mx.int32)
            out = engine.verifier.forward(full, engine.verifier.make_cache(), with_taps=False)
            rows.append(out.logits[0, len(tokens) - 1 : -1].astype(mx.float32))
            mx.eval(rows[-1])
    return mx.concatenate(rows)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--workloads", nargs="+", default=["chat", "prose"])
    p.add_argument("--n", type=int, default=4, help="first N prompts of each workload")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temps", type=float, nargs="+", default=[0.7, 1.0, 1.5])
    p.add_argument("--top-ps", type=float, nargs="+", default=[0.5, 0.9, 0.95, 0.99])
    p.add_argument("--draws", type=int, default=2, help="noise draws per row")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    engine = Engine.load(args.model, None)
    logits = answer_rows(engine, args.workloads, args.n, args.max_tokens)
    results = []
    print(f"{logits.shape[0]} rows x {args.draws} draws")
    for temp in args.temps:
        for top_p in args.top_ps:
            unsure = differ = 0
            for draw in range(args.draws):
                for start in range(0, logits.shape[0], CHUNK):
                    rows = logits[start : start + CHUNK]
                    key = mx.random.key(draw * logits.shape[0] + start)
                    noise = mx.random.gumbel(rows.shape, key=key)
                    tokens, sure = top_p_choice(rows / temp, noise, top_p)
                    exact = mx.argmax(filtered(rows, SamplingParams(temp, top_p)) + noise, -1)
                    unsure += (~sure).sum().item()
                    differ += ((tokens != exact) & sure).sum().item()
            results.append({"temp": temp, "top_p": top_p, "rows": logits.shape[0] * args.draws,
                            "unsure": unsure, "sure_but_differs": differ})
            print(f"temp {temp:4.2f} top-p {top_p:4.2f}: unsure {unsure}, "
                  f"sure but not the sort's token {differ}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))
    return 1 if any(r["sure_but_differs"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
