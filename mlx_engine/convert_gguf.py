"""`python -m mlx_engine.convert_gguf`: the command-line name of `mlx_engine/gguf/cli.py`."""

import sys

from mlx_engine.gguf.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
