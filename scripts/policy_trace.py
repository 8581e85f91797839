"""Log every decision of the adaptive width policy on a workload: why `auto` drafts or not.

Per prompt: the AR, `auto` and fixed-width decode speeds, and per round of the `auto` run the
width chosen, the expected rate of every width relative to an AR step at that moment, the
round's measured seconds against the cost the policy assumed, and each shadow draft's outcome.

    python scripts/policy_trace.py --workload niah --n 6 [--model DIR] [--graph single]
        [--json trace.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx_engine  # noqa: F401  (first: MLX must load behind the fast CPU BLAS)
from mlx_engine import engine as engine_module
from mlx_engine import workloads
from mlx_engine.engine import Engine, RunOptions
from mlx_engine.policy import AdaptiveWidth

LOG: list[dict[str, Any]] = []


class TracedWidth(AdaptiveWidth):
    def next_width(self) -> int:
        rates = self.rates()
        width = super().next_width()
        step = self.costs.cost(1)
        LOG.append({"event": "width", "width": width,
                    "rate_vs_ar": {w: round(r * step, 3) for w, r in rates.items()},
                    "p_accept": [round(p, 3) for p in self.acceptance.probs()[:8]]})
        return width

    def record(self, width: int, accepted: int, seconds: float) -> None:
        LOG.append({"event": "round", "width": width, "accepted": accepted,
                    "ms": round(seconds * 1e3, 3),
                    "assumed_ms": round(self.costs.cost(width) * 1e3, 3)})
        super().record(width, accepted, seconds)

    def observe_shadow(self, width: int, accepted: int) -> None:
        LOG.append({"event": "shadow", "checked": width - 1, "accepted": accepted})
        super().observe_shadow(width, accepted)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="niah")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default="default")
    p.add_argument("--draft", default="default")
    p.add_argument("--dtype")
    p.add_argument("--graph", choices=["two-phase", "single"], default="two-phase")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    engine = Engine.load(args.model, args.draft, args.dtype)
    engine.warmup(RunOptions(graph=args.graph))
    engine_module.AdaptiveWidth = TracedWidth
    fixed = engine.block_size(None)
    costs = engine.costs(RunOptions(graph=args.graph))
    report: dict[str, Any] = {"round_cost_s": costs.measured_json(), "prompts": []}
    for prompt in workloads.load(args.workload)[: args.n]:
        ids = workloads.encode(engine, prompt)
        opts = RunOptions(max_tokens=args.max_tokens, graph=args.graph,
                          ignore_eos=prompt.ignore_eos, stop=tuple(prompt.stop or ()))
        ar = engine.run("ar", ids, opts).stats
        LOG.clear()
        auto = engine.run("fused", ids, opts).stats
        full = engine.run("fused", ids, replace(opts, block_size=fixed)).stats
        report["prompts"].append({
            "id": prompt.id, "prompt_tokens": len(ids),
            "auto_vs_ar": auto.decode_tok_s / ar.decode_tok_s,
            "fixed_vs_ar": full.decode_tok_s / ar.decode_tok_s,
            "auto_blocks": auto.blocks, "auto_ar_steps": auto.ar_steps,
            "auto_shadows": auto.shadows, "fixed_accepted": full.accepted, "log": list(LOG)})
        row = report["prompts"][-1]
        print(f"{prompt.id}: {len(ids)} tokens | auto {row['auto_vs_ar']:.2f}x AR "
              f"({auto.blocks} blocks, {auto.ar_steps} AR steps, {auto.shadows} shadows) | "
              f"{fixed} rows {row['fixed_vs_ar']:.2f}x AR")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
