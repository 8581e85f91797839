"""`python -m mlx_engine.eval_drafter`: a drafter's engine tau per prompt kind, held out.

The bench measures one prompt shape; a drafter tuned on it can fall apart on others. This
runs the MLX engine itself on held-out prompts of each kind of `training.kinds` (cut from
held-out stdlib files, the same way training cuts its own), each stopped the way its use
stops (EOS, the kind's stop strings, its answer cap), plus the README's example. Per prompt:
the AR oracle's answer, then fused decoding at each block size, checked token for token
against it (lossless) with its acceptance length tau. Per kind: tau's mean over prompts (the
target), its median and the pooled tau (committed tokens / verify rounds).

    python -m mlx_engine.eval_drafter --draft DIR --n 6 --json runs/after.json \\
        --markdown runs/after.md --baseline runs/before.json

`--baseline` (an earlier run on the same prompts) reuses its AR answers and puts its taus
beside the new ones in the table. `--compare BEFORE AFTER` (each a JSON or several, comma
separated: kinds split over processes) pairs two finished runs prompt by prompt, which is
what "does a kind regress" needs: per kind and block size, the mean per-prompt change with
two standard errors, prompts won and lost, and the sign test's p.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .engine import Engine, RunOptions
from .errors import UserError, cli_entry
from .sources import DEFAULT
from .training.data import held_out_files
from .training.kinds import KINDS, Kind, sample_prompts
from .workloads import DIR as WORKLOADS_DIR

README_EXAMPLE = WORKLOADS_DIR / "example_prompt.py"
README_KIND = "readme"
README_MAX_TOKENS = 128  # the README's command
DEFAULT_KINDS = ("function_body", "long", "chat", "prose", "short", "snippet", "tail",
                 README_KIND)
# A kind's prompts are drawn with `--seed` + its place here, whatever else runs beside it, so
# kinds split over several processes get the prompts one run of them all would, and earlier
# runs' (a new kind goes last).
SEED_ORDER = ("function_body", "long", "chat", "prose", "short", "snippet", README_KIND,
              "excerpt", "tail")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_engine.eval_drafter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", default=DEFAULT, help="drafter dir (default: bundled)")
    p.add_argument("--model", default=DEFAULT, help="verifier (default: offline Gemma 3 270M)")
    p.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS),
                   choices=[*KINDS, README_KIND])
    p.add_argument("--blocks", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--n", type=int, default=6, help="held-out prompts per kind")
    p.add_argument("--max-tokens", type=int, help="answer cap for every kind (default: each "
                   "kind's own)")
    p.add_argument("--max-prompt-tokens", type=int, help="keep prompt lengths <= this (the "
                   "long kind's 4k prompts are slow to prefill on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", type=Path, help="an earlier run's JSON on the same prompts")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="pair two finished runs' JSONs (comma-separated lists) and exit")
    p.add_argument("--json", type=Path, help="write the results here (required to run)")
    p.add_argument("--markdown", type=Path, help="write the table here too")
    return p


def eval_prompts(engine: Engine, args: argparse.Namespace) -> dict[str, tuple[Kind, list]]:
    """Per kind: (the kind as run, its held-out prompts' token ids), the same for one seed and
    kind whichever other kinds are asked for."""
    tok = engine.tokenizer
    files = held_out_files()

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [tok.encode(t, add_special_tokens=False) for t in texts]

    out: dict[str, tuple[Kind, list]] = {}
    for name in args.kinds:
        if name == README_KIND:
            kind = Kind(README_KIND, lambda *_: None, (), max_tokens=README_MAX_TOKENS)
            prompts = [engine.encode(README_EXAMPLE.read_text(), chat_template=False)]
        else:
            kind = KINDS[name]
            if args.max_prompt_tokens:
                lengths = tuple(n for n in kind.lengths if n <= args.max_prompt_tokens)
                kind = replace(kind, lengths=lengths or kind.lengths[:1])
            prompts = sample_prompts(kind, files, encode_batch, args.n,
                                     random.Random(args.seed + SEED_ORDER.index(name)),
                                     tok.bos_token_id)
        if args.max_tokens:
            kind = replace(kind, max_tokens=args.max_tokens)
        out[name] = (kind, prompts)
    return out


def run_prompt(engine: Engine, kind: Kind, prompt: list[int], blocks: list[int],
               reference: list[int] | None) -> dict[str, Any]:
    """The AR answer (or the baseline's) and, per block size, fused tau and losslessness."""
    opts = RunOptions(max_tokens=kind.max_tokens, stop=kind.stop)
    if reference is None:
        reference = engine.run("ar", prompt, opts).tokens
    row: dict[str, Any] = {"prompt_tokens": len(prompt), "answer_tokens": len(reference),
                           "answer": reference, "blocks": {}}
    for b in blocks:
        t = time.perf_counter()
        result = engine.run("fused", prompt, replace(opts, block_size=b))
        row["blocks"][str(b)] = {
            "tau": result.stats.mean_accept_len, "rounds": len(result.stats.accepted),
            "committed": sum(a + 1 for a in result.stats.accepted),
            "lossless": result.tokens == reference, "seconds": time.perf_counter() - t}
    return row


def summarise(rows: list[dict[str, Any]], blocks: list[int]) -> dict[str, Any]:
    """Per block: tau's mean and median over prompts that drafted at all, pooled tau, and how
    many prompts were lossless."""
    out = {}
    for b in map(str, blocks):
        runs = [r["blocks"][b] for r in rows]
        taus = [r["tau"] for r in runs if r["rounds"]]
        rounds = sum(r["rounds"] for r in runs)
        out[b] = {"mean_tau": statistics.fmean(taus) if taus else float("nan"),
                  "median_tau": statistics.median(taus) if taus else float("nan"),
                  "pooled_tau": sum(r["committed"] for r in runs) / rounds if rounds
                  else float("nan"),
                  "lossless": sum(r["lossless"] for r in runs), "prompts": len(runs)}
    return out


def markdown(result: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """One row per kind: mean tau per block (baseline -> this), sizes, lossless count."""
    blocks = result["blocks"]
    head = ["kind", "prompts", "prompt tok", "answer tok (mean)", "cap"]
    head += [f"tau B={b}" for b in blocks] + ["lossless"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, kind in result["kinds"].items():
        rows, summary = kind["prompts"], kind["summary"]
        before = baseline["kinds"].get(name, {}).get("summary", {}) if baseline else {}
        cells = [name, str(len(rows)),
                 f"{min(r['prompt_tokens'] for r in rows)}-"
                 f"{max(r['prompt_tokens'] for r in rows)}",
                 f"{statistics.fmean(r['answer_tokens'] for r in rows):.0f}",
                 str(kind["max_tokens"])]
        for b in map(str, blocks):
            now = f"{summary[b]['mean_tau']:.2f}"
            cells.append(f"{before[b]['mean_tau']:.2f} -> {now}" if b in before else now)
        lossless = [summary[str(b)]["lossless"] for b in blocks]
        cells.append(f"{min(lossless)}/{len(rows)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load_runs(spec: str) -> dict[str, list[dict[str, Any]]]:
    """Per kind, the prompts of one or more result JSONs (comma-separated paths)."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for path in spec.split(","):
        try:
            result = json.loads(Path(path).read_text())
            kinds.update({name: kind["prompts"] for name, kind in result["kinds"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"cannot read {path} as an eval_drafter result: {exc!r}") from None
    return kinds


def sign_test_p(won: int, lost: int) -> float:
    """Two-sided p of a split at least this uneven if either side were equally likely."""
    n = won + lost
    tail = sum(math.comb(n, i) for i in range(min(won, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(before: dict[str, list], after: dict[str, list]) -> str:
    """Per kind both runs hold and block size, over the prompts both drafted: mean tau before
    -> after, the mean per-prompt change +- 2 standard errors, won / lost, sign test p."""
    lines = ["| kind | B | prompts | tau | change per prompt | won / lost | sign p |",
             "|" + " --- |" * 7]
    shared = [k for k in after if k in before]
    if not shared:
        raise UserError("the two runs share no prompt kind")
    for name in shared:
        if [p["answer"] for p in before[name]] != [p["answer"] for p in after[name]]:
            raise UserError(f"{name}: the two runs did not answer the same prompts")
        pairs = list(zip(before[name], after[name], strict=True))
        for b in (b for b in pairs[0][1]["blocks"] if b in pairs[0][0]["blocks"]):
            taus = [(x["blocks"][b]["tau"], y["blocks"][b]["tau"]) for x, y in pairs
                    if x["blocks"][b]["rounds"] and y["blocks"][b]["rounds"]]
            if not taus:
                continue
            change = [y - x for x, y in taus]
            mean = f"{statistics.fmean(change):+.2f}"
            if len(change) > 1:
                mean += f" +- {2 * statistics.stdev(change) / math.sqrt(len(change)):.2f}"
            won, lost = sum(c > 0 for c in change), sum(c < 0 for c in change)
            lines.append(
                f"| {name} | {b} | {len(taus)} | {statistics.fmean(x for x, _ in taus):.2f} -> "
                f"{statistics.fmean(y for _, y in taus):.2f} | {mean} | {won} / {lost} | "
                f"{sign_test_p(won, lost):.2f} |")
    return "\n".join(lines) + "\n"


def _reference(baseline: dict[str, Any] | None, name: str, i: int,
               prompt: list[int]) -> list[int] | None:
    """The baseline's AR answer to this very prompt, if it ran it."""
    rows = baseline["kinds"].get(name, {}).get("prompts", []) if baseline else []
    if i < len(rows) and rows[i]["prompt"] == prompt:
        return rows[i]["answer"]
    return None


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        table = compare(*(_load_runs(spec) for spec in args.compare))
        if args.markdown:
            args.markdown.write_text(table)
        print(table)
        return 0
    if args.json is None:
        raise UserError("--json is required (where the results go)")
    baseline = None
    if args.baseline is not None:
        try:
            baseline = json.loads(args.baseline.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read --baseline {args.baseline}: {exc}") from None
    engine = Engine.load(args.model, args.draft)
    for b in args.blocks:
        engine.block_size(b)  # one error line for a width the drafter cannot run
    result: dict[str, Any] = {
        "argv": sys.argv, "drafter": str(engine.drafter_info.path),
        "drafter_sha256": engine.drafter_info.sha256, "model_sha256": engine.model_info.sha256,
        "dtype": engine.model_info.dtype, "blocks": args.blocks, "seed": args.seed,
        "baseline": str(args.baseline) if args.baseline else None, "kinds": {}}
    for name, (kind, prompts) in eval_prompts(engine, args).items():
        rows = []
        for i, prompt in enumerate(prompts):
            row = run_prompt(engine, kind, prompt, args.blocks,
                             _reference(baseline, name, i, prompt))
            rows.append({"prompt": prompt, **row})
            taus = " ".join(f"{row['blocks'][str(b)]['tau']:.2f}" for b in args.blocks)
            print(f"{name} {i}: {len(prompt)} + {row['answer_tokens']} tokens, tau {taus}",
                  file=sys.stderr, flush=True)
        result["kinds"][name] = {"max_tokens": kind.max_tokens, "stop": list(kind.stop),
                                 "prompts": rows, "summary": summarise(rows, args.blocks)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    table = markdown(result, baseline)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
