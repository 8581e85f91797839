"""`python -m mlx_engine.bench`: our AR oracle, our fused DFlash loop and mlx-lm's own AR, side
by side in one process on a bundled workload.

Per prompt the three arms run back to back, in an order rotated from prompt to prompt so
drift (thermal, other load) spreads over all of them; warm-up runs first. Greedy, or with
`--temp` sampled with one seed per prompt: either way the fused output is compared with the AR
oracle's token for token (`lossless`). mlx-lm's
`stream_generate` runs on the very same model object with its native caches: it is what
users run today, and the yardstick for our AR loop. A separate profiled fused run per prompt
gives the draft / verify / extend split (profiling adds a host sync per block, so it never
feeds the headline tok/s).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import blas, evidence, peers, workloads
from .engine import DTYPES, Engine, RunOptions, RunResult
from .errors import UserError, cli_entry
from .policy import Acceptance
from .sampling import SamplingParams
from .sources import DEFAULT
from .speculative import GRAPH_MODES, DecodeStats
from .stopping import StopStrings

ARMS = ("ar", "fused", "mlx_lm")
LABELS = {"ar": "our AR", "fused": "fused DFlash", "mlx_lm": "mlx-lm AR"}
WARMUP_PROMPT = list(range(3, 35))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_engine.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True,
                   help=f"one of {', '.join(workloads.NAMES)}, or a .jsonl file of prompts")
    p.add_argument("--n", type=int, default=None, help="first N prompts (default: all)")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--block-size", default="auto",
                   help="verify every block at this width, 2..drafter's, or 'auto': chosen "
                        "each round from measured cost and acceptance (default)")
    p.add_argument("--model", default=DEFAULT,
                   help="mlx-lm model dir or HF id (default: offline Gemma 3 270M, dense; "
                        "default-quantized: the same in its GGUF quantization)")
    p.add_argument("--draft", default=DEFAULT,
                   help="z-lab-format DFlash drafter dir or HF id (default: bundled)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="verifier dtype (default: as stored; offline model fp32 on CPU)")
    p.add_argument("--graph", choices=GRAPH_MODES, default="two-phase")
    p.add_argument("--temp", type=float, default=0.0,
                   help="sample at this temperature (with --top-p, --top-k; our two arms only)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0,
                   help="prompt i samples with seed SEED + i, in both arms (with --temp)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="decode --max-tokens on every prompt (overgen prompts always do)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (default: raw text)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every arm this many times per prompt and keep each arm's run of "
                        "median speed (for short answers on a noisy machine)")
    p.add_argument("--fresh", action="store_true",
                   help="start every prompt's fused runs with no acceptance carried from "
                        "earlier prompts, as each run of the generate CLI starts")
    p.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm arm")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated peer DFlash runtimes run as more arms on the same pair: "
                        f"{', '.join(peers.NAMES)} (pip install '.[peers]'); one that cannot "
                        f"run here is recorded with why")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled fused runs")
    p.add_argument("--openblas", action="store_true",
                   help="re-run this command with OpenBLAS interposed (Linux CPU)")
    p.add_argument("--json", type=Path, default=None, help="write evidence JSON (schema v1)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG summary")
    return p


def _requested_width(value: str) -> int | None:
    """None for the adaptive policy, else the fixed width."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--block-size must be an integer or 'auto', not {value!r}") from None


def mlx_lm_run(engine: Engine, prompt: list[int], opts: RunOptions,
               ) -> tuple[RunResult, dict[str, float]]:
    """mlx-lm's own greedy `stream_generate`, timed with the same clocks as our arms.

    mlx-lm has no ignore-EOS flag; a copy of the tokenizer with no EOS ids gives it the same
    stop rule as ours (a logits processor masking EOS would change the tokens instead). Stop
    strings end it as they end ours (`StopStrings`, token by token).
    """
    from mlx_lm import stream_generate

    tokenizer = engine.tokenizer
    if opts.ignore_eos:
        tokenizer = copy.copy(tokenizer)
        tokenizer.eos_token_ids = []
    stop = StopStrings(engine.tokenizer, opts.stop)
    stats = DecodeStats(prompt_tokens=len(prompt))
    tokens: list[int] = []
    start = first = now = time.perf_counter()
    last = None
    for last in stream_generate(engine.verifier.model, tokenizer, prompt,
                                max_tokens=opts.max_tokens):
        now = time.perf_counter()
        tokens.append(int(last.token))
        if len(tokens) == 1:
            stats.prefill_s, first = now - start, now
        if stop.end(tokens, 1) is not None:
            stats.finish_reason = "stop"
            break
    stats.decode_s, stats.new_tokens = now - first, len(tokens)
    if stats.finish_reason != "stop":
        stats.finish_reason = last.finish_reason or "length"
    return RunResult(tokens, stats), {"generation_tps": last.generation_tps,
                                      "prompt_tps": last.prompt_tps}


class Bench:
    """One loaded engine, its options and the per-prompt runs."""

    def __init__(self, engine: Engine, args: argparse.Namespace, fixed: int | None,
                 peer_arms: list[peers.Peer | peers.Unavailable] | None = None):
        self.engine, self.args = engine, args
        self.width = engine.block_size(fixed)  # the widest block either way
        self.peers = peer_arms or []
        self.running = {p.name: p for p in self.peers if isinstance(p, peers.Peer)}
        self.arms = [a for a in ARMS if a != "mlx_lm" or not args.no_mlx_lm] + list(self.running)
        self.base = RunOptions(max_tokens=args.max_tokens, block_size=fixed, graph=args.graph,
                               sampling=SamplingParams(args.temp, args.top_p, args.top_k))

    def warmup(self) -> None:
        self.engine.warmup(self.base)
        if "mlx_lm" in self.arms:
            mlx_lm_run(self.engine, WARMUP_PROMPT, RunOptions(max_tokens=8, ignore_eos=True))
        for peer in self.running.values():
            peer.run(WARMUP_PROMPT, replace(self.base, max_tokens=8, ignore_eos=True))

    def _runs(self, index: int, ids: list[int], opts: RunOptions
              ) -> tuple[dict[str, RunResult], dict[str, float], bool, dict[str, list[float]]]:
        """Each arm `--repeats` times, in an order rotated per prompt and per repeat; per arm
        the run of median decode speed (a short answer's few steps are at the mercy of other
        load), whether every fused run equalled AR, and every repeat's decode speed. Each fused
        repeat starts from the acceptance the engine had before this prompt (none with
        `--fresh`): it must not learn the prompt itself."""
        kind = opts.sampling.kind
        learned = self.engine.learned_acceptance(kind)
        before = Acceptance(learned.max_width) if self.args.fresh else copy.deepcopy(learned)
        all_runs: dict[str, list[tuple[RunResult, dict[str, float]]]] = {}
        for r in range(self.args.repeats):
            shift = (index + r) % len(self.arms)
            for arm in self.arms[shift:] + self.arms[:shift]:
                if arm == "mlx_lm":
                    run, extra = mlx_lm_run(self.engine, ids, opts)
                elif arm in self.running:
                    run, extra = self.running[arm].run(ids, opts), {}
                else:
                    if arm == "fused" and (r > 0 or self.args.fresh):
                        self.engine.acceptance[kind] = copy.deepcopy(before)
                    run, extra = self.engine.run(arm, ids, opts), {}
                all_runs.setdefault(arm, []).append((run, extra))
        median = {arm: sorted(got, key=lambda g: g[0].stats.decode_tok_s)[len(got) // 2]
                  for arm, got in all_runs.items()}
        ar = median["ar"][0].tokens
        lossless = all(run.tokens == ar for run, _ in all_runs["fused"])
        speeds = {arm: [run.stats.decode_tok_s for run, _ in got]
                  for arm, got in all_runs.items()}
        return ({arm: run for arm, (run, _) in median.items()},
                median.get("mlx_lm", (None, {}))[1], lossless, speeds)

    def sample(self, index: int, prompt: workloads.Prompt, ids: list[int]) -> dict[str, Any]:
        opts = replace(self.base, ignore_eos=prompt.ignore_eos or self.args.ignore_eos,
                       stop=tuple(prompt.stop or ()), seed=self.args.seed + index)
        runs, extra, lossless, speeds = self._runs(index, ids, opts)
        profiled = None
        if not self.args.no_profile:  # its extra sync per block must not teach the policy
            policy = self.engine.policy(opts, learn=False)
            profiled = self.engine.run("fused", ids, replace(opts, profile=True,
                                                             block_size=policy))

        ar, fused = runs["ar"], runs["fused"]
        extensions: evidence.SampleExtensions = {
            "lossless": lossless and (profiled is None or profiled.tokens == ar.tokens),
            "source": prompt.source, "finish_reason": ar.stats.finish_reason, "mlx_lm": None}
        if "mlx_lm" in runs:
            extensions["mlx_lm"] = {**evidence.timing(runs["mlx_lm"]), **extra,
                                    "matches_ar": runs["mlx_lm"].tokens == ar.tokens,
                                    "first_divergence": evidence.first_divergence(
                                        ar.tokens, runs["mlx_lm"].tokens)}
        if prompt.needle is not None:
            text = self.engine.tokenizer.decode(ar.tokens)
            extensions["retrieval"] = {"needle": prompt.needle, "found": prompt.needle in text}
        if self.peers:
            extensions["peers"] = {p.name: peers.record(p, runs.get(p.name), ar.tokens)
                                   for p in self.peers}
        ar_extra: evidence.ArmExtensions = {}
        fused_extra: evidence.ArmExtensions = {}
        if self.args.repeats > 1:
            ar_extra["repeat_decode_tok_s"] = speeds["ar"]
            fused_extra["repeat_decode_tok_s"] = speeds["fused"]
        if profiled is not None:
            s = profiled.stats
            fused_extra["profile"] = {"blocks": s.blocks, "decode_tok_s": s.decode_tok_s,
                                      "time_split_s": evidence.time_split(s)}
        return evidence.sample_record(prompt.id, len(ids), self.width, ar, fused, extensions,
                                      ar_extra, fused_extra)


def bench_aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What the bench adds to evidence.aggregate: the mlx-lm yardstick and NIAH retrieval."""
    paired = [s for s in samples if s.get("mlx_lm") and s["mlx_lm"]["decode_tok_s"] > 0]
    found = [s["retrieval"]["found"] for s in samples if s.get("retrieval")]
    return {
        **per_prompt(samples),
        "mlx_lm_decode_tok_s": evidence.median([s["mlx_lm"]["decode_tok_s"] for s in paired]),
        "ar_vs_mlx_lm": evidence.median([s["ar"]["decode_tok_s"] / s["mlx_lm"]["decode_tok_s"]
                                 for s in paired]),
        "retrieval_rate": sum(found) / len(found) if found else None,
    } | ({"peers": peers.aggregate(samples)} if any("peers" in s for s in samples) else {})


def per_prompt(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompts where fused decoding ran more than 5% slower than AR; with `--repeats` > 1,
    the noise floor under such per-prompt ratios (per prompt, its slowest AR repeat over its
    fastest: below 0.95, AR lost to itself by more than 5%) and the same count on each arm's
    fastest repeat (other load only ever slows a run, so the fastest is the nearest to what
    the run costs alone: what remains below 0.95 there is the method's loss, not the noise)."""
    ratios = evidence.fused_vs_ar(samples)
    out: dict[str, Any] = {"fused_vs_ar_below_0_95": sum(r < 0.95 for r in ratios),
                           "timed_prompts": len(ratios)}
    repeats = [(ar, s["fused"]["repeat_decode_tok_s"]) for s in samples
               if len(ar := s["ar"].get("repeat_decode_tok_s") or []) > 1 and min(ar) > 0]
    if repeats:
        spread = [min(ar) / max(ar) for ar, _ in repeats]
        fastest = [max(fused) / max(ar) for ar, fused in repeats]
        out |= {"ar_vs_ar_min_median": evidence.median(spread),
                "ar_vs_ar_below_0_95": sum(x < 0.95 for x in spread),
                "fastest_fused_vs_ar_below_0_95": sum(x < 0.95 for x in fastest)}
    return out


def summary(record: dict[str, Any]) -> str:
    a = record["aggregate"]

    def num(key: str, fmt: str, unit: str = "") -> str:
        return "n/a" if a.get(key) is None else format(a[key], fmt) + unit

    lossless = {True: "yes", False: "NO", None: "n/a"}[a["lossless_all"]]
    line = (f"{record['workload']}: {len(record['samples'])} prompts, block "
            f"{record['params']['block_size'] or record['drafter']['block_size']} | "
            f"decode tok/s: AR {num('ar_decode_tok_s', '.2f')}, "
            f"fused {num('fused_decode_tok_s', '.2f')} "
            f"({num('speedup_vs_ar', '.2f', 'x')}, tau {num('mean_accept_len', '.2f')})")
    if a.get("mlx_lm_decode_tok_s") is not None:
        line += (f", mlx-lm {num('mlx_lm_decode_tok_s', '.2f')} "
                 f"(our AR {num('ar_vs_mlx_lm', '.2f', 'x')})")
    line += f" | lossless {lossless}"
    if a.get("timed_prompts"):
        line += f" | below 0.95x AR: {a['fused_vs_ar_below_0_95']}/{a['timed_prompts']} prompts"
    if a.get("ar_vs_ar_below_0_95") is not None:
        line += (f" (AR below 0.95x of itself: {a['ar_vs_ar_below_0_95']}; fastest repeats "
                 f"below 0.95x: {a['fastest_fused_vs_ar_below_0_95']})")
    if a.get("retrieval_rate") is not None:
        line += f" | NIAH retrieval {a['retrieval_rate']:.0%}"
    return line + peers.summary(a.get("peers") or {})


def plot(record: dict[str, Any], path: Path) -> None:
    """Three panels: tok/s per arm, acceptance histogram, time per block vs per AR token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = record["samples"]
    fig, (speed, accept, split) = plt.subplots(1, 3, figsize=(16, 4.8))
    arms = [a for a in ARMS if any(s.get(a) for s in samples)]
    for i, arm in enumerate(arms):
        decode = [s[arm]["decode_tok_s"] for s in samples if s.get(arm)]
        e2e = [s[arm]["e2e_tok_s"] for s in samples if s.get(arm)]
        speed.bar(i - 0.2, statistics.median(decode), 0.4, color="C0",
                  label="decode (median)" if i == 0 else None)
        speed.bar(i + 0.2, statistics.median(e2e), 0.4, color="C1",
                  label="end to end (median)" if i == 0 else None)
        speed.scatter([i - 0.2] * len(decode), decode, s=10, color="k", zorder=3,
                      label="per prompt" if i == 0 else None)
    speed.set_xticks(range(len(arms)), [LABELS[a] for a in arms])
    speed.set_ylabel("tokens / s")
    speed.set_title(f"speed (fused {record['aggregate']['speedup_vs_ar'] or 0:.2f}x our AR)")
    speed.legend(fontsize=8)

    hist = [sum(col) for col in zip(*(s["fused"]["accept_hist"] for s in samples), strict=True)]
    accept.bar(range(len(hist)), hist, color="C2")
    accept.set_xlabel("drafts accepted per block")
    accept.set_ylabel("blocks")
    accept.set_title(f"acceptance (tau {record['aggregate']['mean_accept_len'] or 0:.2f} "
                     "tokens / block)")

    runs = [s["fused"].get("profile") or s["fused"] for s in samples]
    blocks = max(sum(r["blocks"] for r in runs), 1)
    bottom = 0.0
    for j, part in enumerate(("draft", "verify", "extend")):
        ms = sum(r["time_split_s"][part] or 0.0 for r in runs) / blocks * 1e3
        split.bar(0, ms, 0.5, bottom=bottom, color=f"C{j + 3}", label=part)
        bottom += ms
    ar_tok_s = record["aggregate"]["ar_decode_tok_s"]
    if ar_tok_s:
        split.bar(1, 1e3 / ar_tok_s, 0.5, color="C7", label="AR step")
    split.set_xticks([0, 1], ["fused block", "AR token"])
    split.set_ylabel("ms")
    profiled = "profiled runs" if runs and "profile" in samples[0]["fused"] else "extend in draft"
    split.set_title(f"time per block vs per AR token ({profiled})")
    split.legend(fontsize=8)

    fig.suptitle(f"{record['workload']} | {record['verifier']['id']} "
                 f"({record['verifier']['dtype']}) + {record['drafter']['id']} | "
                 f"{record['device']['backend']}, {record['device']['chip']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress(items: list, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True)


def _check(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, not {args.max_tokens}")
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be >= 1, not {args.n}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, not {args.repeats}")
    SamplingParams(args.temp, args.top_p, args.top_k)  # bad values: one line, before loading
    if args.temp > 0 and (not args.no_mlx_lm or args.peers):
        raise UserError("--temp compares our AR and fused arms only (mlx-lm's and the peers' "
                        "samples are their own): add --no-mlx-lm and leave out --peers")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    evidence.code_version()  # the code as it is now, before the run
    if args.openblas:
        blas.reexec_with_openblas(__spec__.name, argv)
    _check(args)
    fixed = _requested_width(args.block_size)
    peer_names = peers.parse(args.peers)
    prompts = workloads.load(args.workload)[: args.n]
    engine = Engine.load(args.model, args.draft, args.dtype)
    bench = Bench(engine, args, fixed, peers.load(peer_names, engine))
    for peer in bench.peers:
        if isinstance(peer, peers.Unavailable):
            print(f"peer {peer.name} unavailable: {peer.why}", file=sys.stderr)
    ids = [workloads.encode(engine, p, args.chat_template) for p in prompts]

    blas_info = blas.detect()  # after every input check: bad input prints one line only
    print(f"blas: {blas_info.describe()}", file=sys.stderr)
    if (warning := blas.warning(blas_info)) is not None:
        print(warning, file=sys.stderr)
    params: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v)
                              for k, v in vars(args).items()}
    params["timing"] = ("per prompt: arms back to back, order rotated; time_split_s from the "
                        "main fused run (extend inside draft), fused.profile from a separate "
                        "profiled run; " + evidence.TIMING)

    bench.warmup()
    if fixed is None:
        params["round_cost_s"] = engine.costs(bench.base).measured_json()

    samples: list[dict[str, Any]] = []
    bar = _progress(list(zip(prompts, ids, strict=True)), args.workload)
    for i, (prompt, prompt_ids) in enumerate(bar):
        samples.append(bench.sample(i, prompt, prompt_ids))
        speedups = [s["fused"]["decode_tok_s"] / s["ar"]["decode_tok_s"] for s in samples
                    if s["ar"]["decode_tok_s"] > 0]
        bar.set_postfix(speedup=f"{evidence.median(speedups) or 0:.2f}x",
                        lossless=all(s["lossless"] for s in samples))

    command = shlex.join(["python", "-m", __spec__.name, *argv])
    record = evidence.build_record(engine, params, samples, bench.width, command=command,
                                   workload=args.workload,
                                   aggregate_extra=bench_aggregate(samples))
    print(summary(record), file=sys.stderr)
    if args.json is not None:
        evidence.write(record, args.json)
    if args.plot is not None:
        plot(record, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
