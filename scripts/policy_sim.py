"""Replay the adaptive width policy on recorded acceptance: its decisions and speed, in seconds.

Under greedy decoding the committed text is the verifier's AR answer whatever the widths, so
how many drafts a round at any token would have had accepted can be measured once per token
(the training evaluator's exact replay) and the policy's whole run simulated from that table
and the device's round costs: which width each round takes, which shadow drafts it makes, and
the decode time against plain AR steps, for every prompt of a workload, in well under a second.
A policy change is then compared on every bundled workload before a bench confirms it.

    python scripts/policy_sim.py record --workloads short natural --out runs/sim/answers.json
    python scripts/policy_sim.py replay --answers runs/sim/answers.json --out runs/sim/accepted.json
    python scripts/policy_sim.py simulate --accepted runs/sim/accepted.json [--fresh] \
        [--costs EVIDENCE]

`record` runs the MLX engine (AR answers, the bench's stop rules, and the round costs this
device's warm-up measures); `replay` needs the torch extra; `simulate` reads the costs from a
bench evidence file's `params.round_cost_s` when given one. A bench carries what one prompt's
rounds saw to the next prompt's first rounds; `--fresh` starts every prompt on a new engine, as
each run of the `generate` CLI does. A shadow draft is charged
`--shadow-cost` AR steps (a drafter forward over SHADOW_HORIZON + 1 rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from mlx_engine.policy import (
    SHADOW_HORIZON,
    Acceptance,
    AdaptiveWidth,
    RoundCosts,
    ShadowCheck,
)


def record(args: argparse.Namespace) -> None:
    from mlx_engine import workloads
    from mlx_engine.engine import Engine, RunOptions

    engine = Engine.load()
    costs = engine.calibrate()
    out: dict[str, Any] = {"round_cost_s": costs.measured_json(),
                           "block_size": engine.block_size(None), "workloads": {}}
    for name in args.workloads:
        rows = []
        for prompt in workloads.load(name)[: args.n]:
            ids = workloads.encode(engine, prompt)
            opts = RunOptions(max_tokens=args.max_tokens, ignore_eos=prompt.ignore_eos,
                              stop=tuple(prompt.stop or ()))
            tokens = engine.run("ar", ids, opts).tokens
            rows.append({"id": prompt.id, "prompt": ids, "answer": tokens})
            print(f"{name} {prompt.id}: {len(tokens)} tokens", flush=True)
        out["workloads"][name] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))


def replay(args: argparse.Namespace) -> None:
    import torch

    from mlx_engine.gguf.convert import default_verifier_dir
    from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
    from mlx_engine.reference.torch_target import load_target
    from mlx_engine.sources import resolve_drafter
    from mlx_engine.training.evaluate import accepted_per_anchor

    answers = json.loads(Path(args.answers).read_text())
    target = load_target(default_verifier_dir("float32"))
    drafter = TorchDFlashDrafter.from_pretrained(resolve_drafter(args.draft))
    block = answers["block_size"]
    for name, rows in answers["workloads"].items():
        for row in rows:
            # padded so that every answer token anchors a whole block; drafts past the
            # answer's end match nothing
            tokens = row["prompt"] + row["answer"] + [0] * block
            with torch.no_grad():
                accepted = accepted_per_anchor(target, drafter, tokens, len(row["prompt"]),
                                               block)
            row["accepted"] = accepted[: len(row["answer"])]
            print(f"{name} {row['id']}: mean {statistics.mean(row['accepted']):.2f}",
                  flush=True)
    Path(args.out).write_text(json.dumps(answers))


def _table_shadow(anchor: int, accepted: int) -> ShadowCheck:
    """The shadow check of a block anchored at answer token `anchor`, in a table whose
    committed tokens are their positions: its first `accepted` drafts match, the next differs."""
    hit = min(accepted, SHADOW_HORIZON)
    return ShadowCheck(lambda: [*range(anchor + 1, anchor + 1 + hit),
                                *[-1] * (SHADOW_HORIZON - hit)])


def simulate_prompt(policy: AdaptiveWidth, accepted: list[int], costs: dict[int, float],
                    shadow_cost: float) -> dict[str, Any]:
    """One fused run as `speculative.fused_stream` makes it, timed from `costs`. Token j of
    the answer (j = 0 is prefill's) anchors a round that would accept `accepted[j]` drafts;
    shadow drafts are checked by the loop's own `ShadowCheck`."""
    n = len(accepted)
    pos, seconds, width = 0, 0.0, policy.next_width()
    rounds: list[tuple[int, int]] = []  # (width, accepted); width 1: an AR step
    shadows = 0
    while pos < n - 1:
        if width > 1:
            got = min(accepted[pos], width - 1, n - 1 - pos)
            seconds += costs[width]
            policy.record(width, got, costs[width])
            rounds.append((width, got))
            pos += got + 1
            width = policy.next_width()
            continue
        shadow: ShadowCheck | None = None
        while True:  # an AR segment: one committed token per decision
            width = policy.next_width()
            pos += 1
            seconds += costs[1]
            if shadow is not None and (outcome := shadow.see(pos)) is not None:
                policy.observe_shadow(*outcome)
                shadow = None
            if width == 1 and shadow is None and policy.shadow_due():
                shadow, shadows = _table_shadow(pos, accepted[pos]), shadows + 1
                seconds += shadow_cost * costs[1]
            policy.record(1, 0, costs[1])
            rounds.append((1, 0))
            if pos >= n - 1 or width != 1:
                if shadow is not None and (outcome := shadow.end()) is not None:
                    policy.observe_shadow(*outcome)
                break
    ar_seconds = (n - 1) * costs[1]
    drafted = [a for w, a in rounds if w > 1]
    return {"tokens": n, "fused_vs_ar": ar_seconds / seconds if seconds else 1.0,
            "blocks": len(drafted), "ar_steps": len(rounds) - len(drafted), "shadows": shadows,
            "failed_blocks": sum(a == 0 for a in drafted)}


def simulate(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.accepted).read_text())
    measured = data["round_cost_s"]
    if args.costs:
        measured = json.loads(Path(args.costs).read_text())["params"]["round_cost_s"]
    costs = {int(w): float(c) for w, c in measured.items()}
    block = data["block_size"]
    report: dict[str, Any] = {"round_cost_s": measured, "shadow_cost": args.shadow_cost,
                              "fresh": args.fresh, "workloads": {}}
    for name, rows in data["workloads"].items():
        acceptance = Acceptance(block)
        results = []
        for row in rows:
            if len(row["answer"]) < 2:
                continue
            if args.fresh:  # every prompt on a new engine, as each `generate` CLI run is
                acceptance = Acceptance(block)
            policy = AdaptiveWidth(RoundCosts(costs), block, acceptance)
            results.append({"id": row["id"], **simulate_prompt(policy, row["accepted"], costs,
                                                              args.shadow_cost)})
        ratios = [r["fused_vs_ar"] for r in results]
        summary = report["workloads"][name] = {
            "median": statistics.median(ratios), "below_0_95": sum(r < 0.95 for r in ratios),
            "worst": min(ratios), "prompts": results}
        worst = sorted(results, key=lambda r: r["fused_vs_ar"])[:3]
        print(f"{name:13s} median {summary['median']:.2f}x  "
              f"below 0.95x {summary['below_0_95']}/{len(ratios)}  worst "
              + ", ".join(f"{r['fused_vs_ar']:.2f} ({r['tokens']} tok, {r['failed_blocks']} "
                          f"failed of {r['blocks']})" for r in worst))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="AR answers and round costs (MLX)")
    r.add_argument("--workloads", nargs="+", default=["short", "natural", "code-natural",
                                                      "chat", "prose", "code"])
    r.add_argument("--n", type=int, default=None)
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--out", required=True)
    r.set_defaults(run=record)
    q = sub.add_parser("replay", help="accepted drafts at every answer token (torch)")
    q.add_argument("--answers", required=True)
    q.add_argument("--draft", default="default")
    q.add_argument("--out", required=True)
    q.set_defaults(run=replay)
    s = sub.add_parser("simulate", help="the policy's run on every prompt")
    s.add_argument("--accepted", required=True)
    s.add_argument("--costs", help="a bench evidence JSON whose round costs to use")
    s.add_argument("--shadow-cost", type=float, default=0.25)
    s.add_argument("--fresh", action="store_true",
                   help="every prompt on a new engine (no acceptance carried between prompts)")
    s.add_argument("--json")
    s.set_defaults(run=simulate)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
