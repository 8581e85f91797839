"""Train a DFlash drafter for a target by self-distillation, and export it in z-lab format.

    python -m mlx_engine.train_drafter --out runs/gemma3 [--model DIR|FILE.gguf] ...

Steps: code prompts from the stdlib (held-out files kept aside), the target's own greedy
continuations, DFlash training (random anchors, masked blocks, decay-weighted CE), export
(config.json + safetensors shards < 16 MiB), held-out acceptance length tau at several
block sizes, train_log.json and loss_curve.png. `--tiny-random-target` runs the whole thing
on CPU in a minute against a random tiny Gemma 3. Needs the `torch` extra, not mlx.

On several GPUs of one host: `torchrun --nproc-per-node N -m mlx_engine.train_drafter ...`
(generation, training and evaluation split over the N ranks; see training/distributed.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserError, cli_entry

RUN_FILE = "run.json"
DATA_FILE = "data.npz"


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 1")
    return value


def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None


class _Parser(argparse.ArgumentParser):
    """Bad flags are bad input like any other: one line and exit 2, via cli_entry."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mlx_engine.train_drafter",
        description="Train a DFlash drafter for a target model (torch; CUDA or CPU).",
    )
    p.add_argument("--out", required=True, type=Path, help="run dir (data, checkpoint, export)")
    p.add_argument("--model", type=Path, help="target: HF/mlx-lm dir or Gemma 3 .gguf "
                   "(default: the converted offline verifier, float32)")
    p.add_argument("--tiny-random-target", action="store_true",
                   help="build a tiny random Gemma 3 target in OUT/tiny-target (smoke runs)")
    p.add_argument("--data", type=Path, help="token cache .npz to start from (prompts, and "
                   "continuations if already generated)")
    p.add_argument("--prepare-only", action="store_true",
                   help="write OUT/data.npz with the prompts (tokenizer only) and stop")
    g = p.add_argument_group("drafter")
    g.add_argument("--block-size", type=_positive, default=16)
    g.add_argument("--num-layers", type=_positive, default=4)
    g.add_argument("--head-dim", type=_positive, default=64)
    g.add_argument("--num-heads", type=_positive, help="default: hidden / head-dim")
    g.add_argument("--num-kv-heads", type=_positive, help="default: half the heads")
    g.add_argument("--intermediate-size", type=_positive, help="default: 2 x hidden")
    g.add_argument("--mask-token-id", type=int, help="default: the first <unusedN> token")
    g.add_argument("--init", type=Path, help="start from this z-lab drafter dir (its config "
                   "replaces the flags above); its held-out tau is reported next to the result")
    d = p.add_argument_group("data")
    d.add_argument("--num-prompts", type=_positive, default=8192, help="training prompts")
    d.add_argument("--eval-prompts", type=_positive, default=64, help="held-out prompts")
    d.add_argument("--min-prompt-tokens", type=_positive, default=64)
    d.add_argument("--max-prompt-tokens", type=_positive, default=512)
    d.add_argument("--function-prompts", type=_fraction, default=0.0, metavar="FRACTION",
                   help="share of prompts that end where a function body starts (the "
                        "code-completion task); the rest are excerpts cut at any line")
    d.add_argument("--mix", metavar="KIND=WEIGHT,...",
                   help="prompt kinds and their weights, replacing --function-prompts: "
                        "excerpt, function_body, long, chat, prose, short "
                        "(mlx_engine/training/kinds.py)")
    d.add_argument("--gen-tokens", type=_positive, default=256,
                   help="greedy continuation length per prompt")
    d.add_argument("--gen-batch-size", type=_positive, default=256)
    d.add_argument("--gen-time-limit", type=float, help="stop generating after this many "
                   "seconds and drop the training prompts left without a continuation")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=_positive, default=3000)
    t.add_argument("--batch-size", type=_positive, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seq-len", type=_positive, default=768,
                   help="training window: prompt + continuation tokens kept")
    t.add_argument("--anchors-per-seq", type=_positive, default=64)
    t.add_argument("--gamma", type=float, help="loss decay; default 7 for B=16 (DFlash)")
    t.add_argument("--time-limit", type=float, help="training wall-clock budget in seconds "
                   "(summed over resumes); the LR schedule completes within it")
    t.add_argument("--train-until", type=float, help="end training this many seconds after "
                   "the command started, whatever loading and generation took (GPU leases)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    t.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="drafter compute (auto: bf16 autocast on CUDA, fp32 on CPU)")
    t.add_argument("--log-every", type=_positive, default=10)
    t.add_argument("--ckpt-every", type=_positive, default=250)
    t.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    e = p.add_argument_group("export / eval")
    e.add_argument("--export-dtype", choices=["float16", "bfloat16", "float32"],
                   default="float16")
    e.add_argument("--eval-block-sizes", type=_sizes, default=[4, 8, 16])
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _target_path(args: argparse.Namespace) -> Path:
    if args.tiny_random_target:
        from .reference.tiny_target import build_tiny_target

        path = args.out / "tiny-target"
        if not (path / "config.json").is_file():
            build_tiny_target(path, seed=args.seed)
        return path
    if args.model is not None:
        if not args.model.exists():
            raise UserError(f"target {args.model} does not exist")
        return args.model
    try:
        from .gguf.convert import default_verifier_dir
    except ImportError:
        raise UserError("no default verifier here; pass --model DIR|FILE.gguf") from None
    return Path(default_verifier_dir("float32"))


def _mix(args: argparse.Namespace) -> dict[str, float]:
    from .training.mix import parse_mix

    f = args.function_prompts
    return parse_mix(args.mix or f"excerpt={1 - f},function_body={f}")


def _token_cache(args: argparse.Namespace, model_path: Path) -> Any:
    from .training.data import TokenCache
    from .training.mix import build_prompt_cache

    own = args.out / DATA_FILE
    if args.data is not None and not (args.resume and own.is_file()):
        return TokenCache.load(args.data)
    mix = _mix(args)
    if own.is_file():
        cache = TokenCache.load(own)
        wanted = (args.seed, args.min_prompt_tokens, args.max_prompt_tokens,
                  args.num_prompts, args.eval_prompts, mix)
        if args.resume or _prompt_params(cache) == wanted:
            return cache
    from .reference.torch_target import load_tokenizer

    cache = build_prompt_cache(
        load_tokenizer(model_path), args.num_prompts, args.eval_prompts,
        args.min_prompt_tokens, args.max_prompt_tokens, args.seed, mix, args.mask_token_id,
    )
    cache.save(own)
    return cache


def _prompt_params(cache: Any) -> tuple[Any, ...]:
    m = cache.meta
    return (m["seed"], m["min_prompt_tokens"], m["max_prompt_tokens"],
            len(cache.indices(held_out=False)), len(cache.indices(held_out=True)),
            m.get("mix"))


def _drafter_config(args: argparse.Namespace, target: Any, mask_token_id: int) -> Any:
    from .drafter_config import DrafterConfig, build_target_layer_ids

    hidden = target.hidden_size
    heads = args.num_heads or max(1, hidden // args.head_dim)
    kv_heads = args.num_kv_heads or (heads // 2 if heads % 2 == 0 else heads)
    return DrafterConfig(
        hidden_size=hidden,
        intermediate_size=args.intermediate_size or 2 * hidden,
        num_hidden_layers=args.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=args.head_dim,
        vocab_size=target.vocab_size,
        block_size=args.block_size,
        mask_token_id=mask_token_id,
        target_layer_ids=build_target_layer_ids(target.num_layers, args.num_layers),
        num_target_layers=target.num_layers,
        max_position_embeddings=int(
            getattr(target.model.config, "max_position_embeddings", 32768)
        ),
        layer_types=["full_attention"] * args.num_layers,
    )


def _check_run(args: argparse.Namespace, drafter_cfg: dict[str, Any], main: bool) -> None:
    """A resumed run must build the same drafter; a fresh run records what it builds."""
    run_file = args.out / RUN_FILE
    if args.resume and run_file.is_file():
        saved = json.loads(run_file.read_text())["drafter_config"]
        if saved != drafter_cfg:
            diff = sorted(k for k in set(saved) | set(drafter_cfg)
                          if saved.get(k) != drafter_cfg.get(k))
            raise UserError(f"--resume: the checkpoint's drafter differs in {diff}; "
                            "rerun with the original flags")
    if main:
        run = {"argv": sys.argv, "args": vars(args), "drafter_config": drafter_cfg}
        run_file.write_text(json.dumps(run, indent=2, default=str))


def _start_drafter(args: argparse.Namespace, target: Any, cache: Any, group: Any) -> Any:
    """The drafter training starts from: --init's, or a fresh one built for this target.

    Checked against the target (a mismatch is one line, before anything runs it) and recorded
    in run.json, which a --resume must match.
    """
    import torch

    from .drafter_config import check_compatible
    from .reference.torch_drafter import TorchDFlashDrafter, config_dict
    from .training import distributed

    init = None
    if args.init is not None:
        init = TorchDFlashDrafter.from_pretrained(args.init, target.device)
        cfg = init.config
    else:
        mask_id = (args.mask_token_id if args.mask_token_id is not None
                   else cache.meta["mask_token_id"])
        cfg = _drafter_config(args, target, mask_id)
    check_compatible(cfg, target.hidden_size, target.vocab_size, target.num_layers)
    _check_run(args, config_dict(cfg), group.main)
    torch.manual_seed(args.seed)
    drafter = init if init is not None else TorchDFlashDrafter(cfg).to(target.device)
    distributed.broadcast_parameters(drafter, group)
    return drafter


def _train(
    args: argparse.Namespace, target: Any, cache: Any, drafter: Any, t0: float, group: Any
) -> Any:
    """Train `drafter` (resuming if asked); the Trainer."""
    from .training.loop import TrainConfig, Trainer
    from .training.objective import default_gamma

    train_cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        anchors_per_seq=args.anchors_per_seq, seq_len=args.seq_len,
        gamma=args.gamma or default_gamma(drafter.config.block_size), seed=args.seed,
        time_limit_s=args.time_limit, log_every=args.log_every, ckpt_every=args.ckpt_every,
        autocast_bf16=(args.dtype == "bfloat16"
                       or (args.dtype == "auto" and target.device.type == "cuda")),
    )
    trainer = Trainer(target, drafter, cache, train_cfg, args.out, group)
    if args.resume:
        trainer.load()
    if args.train_until is not None:
        left = args.train_until - (time.perf_counter() - t0)
        if left <= 0:
            raise UserError(f"--train-until {args.train_until:g}s passed before training began")
        limit = trainer.elapsed + left
        train_cfg.time_limit_s = min(limit, args.time_limit) if args.time_limit else limit
    trainer.run(show_progress=not args.quiet)
    return trainer


def _held_out_taus(
    args: argparse.Namespace, target: Any, cache: Any, drafter: Any, group: Any
) -> list:
    """Acceptance length of `drafter` on the held-out prompts, at each --eval-block-sizes:
    over all of them, and per kind when there are several. Ranks replay a share of the
    prompts each and add up their rounds and tokens."""
    from .training import distributed
    from .training.evaluate import acceptance_length, pooled

    kinds = {name: idx for name in cache.kind_names()
             if (idx := cache.indices(held_out=True, kind=name))}
    rows = []
    for b in args.eval_block_sizes:
        if not 2 <= b <= drafter.config.block_size:
            continue
        parts = []
        for name, idx in kinds.items():
            mine = idx[group.rank :: group.world]
            counts = acceptance_length(target, drafter, [cache.prompts[i] for i in mine],
                                       [cache.continuations[i] for i in mine], b)
            parts.append({"prompts": name, "block_size": b,
                          **pooled(distributed.gather(counts, group))})
        total = pooled(parts)
        rows.append({"prompts": "all", "block_size": b, **total})
        rows += parts if len(parts) > 1 else []
    return rows


def _export_and_report(
    args: argparse.Namespace, target: Any, cache: Any, trainer: Any, timings: dict[str, float],
    init_taus: list | None, group: Any,
) -> None:
    """Export, measure held-out tau with the exported weights, write the log and the curve."""
    import torch

    from .reference.torch_drafter import TorchDFlashDrafter, config_dict
    from .training import distributed
    from .training.export import checkpoint_bytes, export_drafter
    from .training.loop import plot_curve, write_json

    export_dir = args.out / "drafter"
    with distributed.main_first(group):
        exported = (export_drafter(trainer.drafter, export_dir, args.export_dtype) if group.main
                    else TorchDFlashDrafter.from_pretrained(export_dir, target.device).eval())
    t = time.perf_counter()
    taus = _held_out_taus(args, target, cache, exported, group)
    timings["eval_s"] = time.perf_counter() - t
    if not group.main:
        return
    params = sum(p.numel() for p in trainer.drafter.parameters())
    log = {
        "argv": sys.argv, "args": vars(args), "device": str(target.device),
        "torch": torch.__version__,
        "drafter_config": config_dict(trainer.drafter.config, args.export_dtype),
        "params": params, "export_bytes": checkpoint_bytes(export_dir),
        "train_config": vars(trainer.cfg), "steps_done": trainer.step,
        "data_parallel_ranks": group.world,
        "train_sequences": len(trainer.sequences),
        "held_out_sequences": len(cache.indices(held_out=True)),
        "dropped_without_continuation": cache.meta.get("dropped_without_continuation", 0),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "held_out_tau": taus, "history": trainer.history,
    }
    if args.init is not None:
        log["init"] = {"dir": str(args.init), "held_out_tau": init_taus}
    write_json(args.out / "train_log.json", log)
    if trainer.history:
        plot_curve(trainer.history, args.out / "loss_curve.png",
                   f"DFlash drafter, B={trainer.block_size}, {params / 1e6:.1f}M params")
    summary = ", ".join(f"{r['prompts']} B={r['block_size']}: {r['tau']:.2f}" for r in taus)
    print(f"exported {export_dir} ({log['export_bytes'] / 2**20:.1f} MiB); "
          f"held-out tau {summary}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.block_size < 2:
        raise UserError(f"--block-size {args.block_size} must be at least 2")
    if args.min_prompt_tokens > args.max_prompt_tokens:
        raise UserError(f"--min-prompt-tokens {args.min_prompt_tokens} > "
                        f"--max-prompt-tokens {args.max_prompt_tokens}")
    if args.init is not None and not (args.init / "config.json").is_file():
        raise UserError(f"--init {args.init} is not a drafter dir (no config.json)")
    try:
        import torch  # noqa: F401 - fail here, in one line, without the extra
    except ImportError:
        raise UserError("training needs torch: pip install 'kakeya-mlx[torch]'") from None
    from .training.loop import CHECKPOINT

    if args.resume and not (args.out / CHECKPOINT).is_file():
        raise UserError(f"--resume: no {CHECKPOINT} in {args.out}")
    from .training import distributed

    group, device = distributed.init(args.device)
    try:
        return _run(args, group, device)
    finally:
        distributed.finish(group)


def _run(args: argparse.Namespace, group: Any, device: Any) -> int:
    """Every step of the run; each rank runs it all, on its share of the work."""
    from .reference.torch_target import load_target
    from .training import distributed
    from .training.data import fill_continuations

    t0 = time.perf_counter()
    with distributed.main_first(group):  # rank 0 builds the files the others then read
        args.out.mkdir(parents=True, exist_ok=True)
        model_path = _target_path(args)
        cache = _token_cache(args, model_path)
    timings = {"prompts_s": time.perf_counter() - t0}
    if args.prepare_only:
        if group.main:
            cache.save(args.out / DATA_FILE)
            print(f"wrote {len(cache.prompts)} prompts to {args.out / DATA_FILE}")
        return 0

    t = time.perf_counter()
    target = load_target(model_path, device)
    timings["load_target_s"] = time.perf_counter() - t
    if cache.meta["vocab_size"] != target.vocab_size:
        raise UserError(f"token cache vocab_size {cache.meta['vocab_size']} != "
                        f"target vocab_size {target.vocab_size}")
    if not cache.has_continuations(args.gen_tokens):
        t = time.perf_counter()
        generate = distributed.sharded(lambda prompts, n, deadline: target.greedy_continue(
            prompts, n, args.gen_batch_size, cache.meta["eos_ids"],
            not args.quiet and group.main, deadline), group)
        dropped = fill_continuations(cache, generate, args.gen_tokens, args.gen_time_limit)
        if group.main:
            cache.save(args.out / DATA_FILE)
        timings["generate_s"] = time.perf_counter() - t
        if dropped and group.main:
            print(f"--gen-time-limit: dropped {dropped} training prompts without a continuation")
    drafter = _start_drafter(args, target, cache, group)
    init_taus = None
    if args.init is not None:
        t = time.perf_counter()
        init_taus = _held_out_taus(args, target, cache, drafter, group)
        timings["eval_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer = _train(args, target, cache, drafter, t0, group)
    timings["train_s"] = time.perf_counter() - t
    _export_and_report(args, target, cache, trainer, timings, init_taus, group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
