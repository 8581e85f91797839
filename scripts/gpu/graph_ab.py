"""Graph modes side by side: per prompt, AR then every `--graph` mode at one width, in rotated
order, so a machine whose speed drifts reaches every arm alike; and where a round's time goes
(host graph building against device evaluation).

    python scripts/gpu/graph_ab.py --model DIR --n 16 --width 16 --json F.json

(any machine: on a CPU, evaluation is most of every forward).

Prints each mode's median speed against AR (per prompt, then the median), tau, and the
median seconds per drafted round; then, on one prompt's cache, the host time to build a
1-row and a `width`-row verify graph and a draft graph, and the time to build and evaluate
each (the device's share is the difference).
"""

from __future__ import annotations

import argparse
import json
import statistics

from timing import median_ms

from mlx_engine import workloads
from mlx_engine.engine import Engine, RunOptions
from mlx_engine.evidence import code_version
from mlx_engine.proposer import DFlashDraftSource
from mlx_engine.sampling import GREEDY
from mlx_engine.speculative import GRAPH_MODES, mx


def paired(engine: Engine, ids: list[list[int]], width: int, tokens: int,
           modes: list[str]) -> dict:
    rows = []
    for i, prompt in enumerate(ids):
        arms = ["ar", *modes]
        arms = arms[i % len(arms):] + arms[: i % len(arms)]
        out = {}
        for arm in arms:
            opts = RunOptions(max_tokens=tokens, ignore_eos=True, block_size=width,
                              graph="two-phase" if arm == "ar" else arm)
            result = engine.run("ar" if arm == "ar" else "fused", prompt, opts)
            s = result.stats
            out[arm] = {"tok_s": s.decode_tok_s, "tau": s.mean_accept_len,
                        "round_s": s.decode_s / max(1, s.rounds), "tokens": result.tokens}
        for m in modes:
            assert out[m]["tokens"] == out["ar"]["tokens"], f"{m} differs from AR on prompt {i}"
        rows.append({a: {k: v for k, v in o.items() if k != "tokens"} for a, o in out.items()})
        print(i, {m: round(rows[-1][m]["tok_s"] / rows[-1]["ar"]["tok_s"], 3) for m in modes},
              flush=True)
    summary = {m: {
        "median_vs_ar": statistics.median(r[m]["tok_s"] / r["ar"]["tok_s"] for r in rows),
        "tau": statistics.mean(r[m]["tau"] for r in rows),
        "round_ms": 1000 * statistics.median(r[m]["round_s"] for r in rows),
    } for m in modes}
    summary["ar_step_ms"] = 1000 * statistics.median(1 / r["ar"]["tok_s"] for r in rows)
    return {"summary": summary, "prompts": rows}


def anatomy(engine: Engine, prompt: list[int], width: int) -> dict:
    verifier = engine.verifier
    source = DFlashDraftSource(engine.drafter, verifier, engine.draft_head)
    cache = verifier.make_cache()
    verifier.prefill(mx.array([prompt]), cache, source.extend)
    mx.eval([c.state for c in cache], source.pending())

    def verify(rows: int, evaluate: bool):
        def run():
            out = verifier.forward(mx.ones((1, rows), dtype=mx.int32), cache)
            if evaluate:
                mx.eval(out.logits, out.taps)
            verifier.trim(cache, rows)
        return run

    def draft(evaluate: bool):
        def run():
            d = source.propose(mx.array([1]), width, GREEDY, 0)
            if evaluate:
                mx.eval(d)
        return run

    result = {}
    for name, build, full in (("verify_1", verify(1, False), verify(1, True)),
                              (f"verify_{width}", verify(width, False), verify(width, True)),
                              ("draft", draft(False), draft(True))):
        result[name] = {"build_ms": median_ms(build), "build_eval_ms": median_ms(full)}
    mx.eval([c.state for c in cache])
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--draft", default="default")
    p.add_argument("--workload", default="code")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--modes", default=",".join(GRAPH_MODES))
    p.add_argument("--json")
    args = p.parse_args(argv)
    tool = code_version()
    engine = Engine.load(args.model, args.draft)
    ids = [workloads.encode(engine, q) for q in workloads.load(args.workload)[: args.n]]
    modes = args.modes.split(",")
    for m in modes:  # compile every shape once
        engine.run("fused", ids[0], RunOptions(max_tokens=48, ignore_eos=True,
                                               block_size=args.width, graph=m))
    report = {"anatomy": anatomy(engine, ids[0], args.width),
              **paired(engine, ids, args.width, args.tokens, modes),
              "device": str(mx.default_device()), "args": vars(args), "tool": tool}
    print(json.dumps({"anatomy": report["anatomy"], "summary": report["summary"]}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
