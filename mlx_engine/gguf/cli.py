"""`python -m mlx_engine.convert_gguf`: convert (or find in the cache) and print the model dir.

    python -m mlx_engine.convert_gguf [--out DIR] [--dtype float32] [--keep-quantization]
                                      [--gguf PATH] [--force] [--quiet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_engine.errors import UserError, cli_entry
from mlx_engine.gguf.cache import DEFAULT_STEM, cache_dir
from mlx_engine.gguf.convert import SUPPORTED_DTYPES, ensure_converted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_engine.convert_gguf",
        description="Convert the Gemma 3 270M GGUF (PyPI) into a cached mlx-lm model directory.",
    )
    parser.add_argument("--out", type=Path, help="output dir (default: under KAKEYA_CACHE_DIR)")
    parser.add_argument("--dtype", default="float32", choices=SUPPORTED_DTYPES)
    parser.add_argument("--keep-quantization", action="store_true",
                        help="keep the GGUF's quantized blocks where MLX holds them exactly "
                             "(float32 only)")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the PyPI Gemma 3 270M)")
    parser.add_argument("--force", action="store_true", help="convert even if the output is valid")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Convert (or find in the cache) and print the output directory."""
    args = build_parser().parse_args(argv)
    if args.gguf is not None and not args.gguf.is_file():
        raise UserError(f"GGUF file not found: {args.gguf}")
    keep = args.keep_quantization
    if args.out is None:
        stem = DEFAULT_STEM if args.gguf is None else args.gguf.stem
        out_dir = cache_dir(stem, args.dtype, keep)
    else:
        out_dir = args.out.expanduser().absolute()
    ensure_converted(out_dir, args.dtype, keep, args.gguf, force=args.force,
                     progress=not args.quiet, replace_any=args.out is None)
    print(out_dir)
    return 0
