"""kakeya-mlx engine: lossless DFlash speculative decoding on MLX."""

import os

__version__ = "0.1.0"

# Greedy speculative decoding is exact only if a verify block (a GEMM over B rows) computes
# each row's logits as the AR step (a GEMV over one row) does. MLX may run float32 GEMMs, not
# GEMVs, in TF32 on CUDA tensor cores and Apple M5 Neural Accelerators (`MLX_ENABLE_TF32`,
# default on), which can flip near-tie argmaxes: on an H200 with it on, 2 of 40 float32
# samples diverged from AR. The float32 paths exist for exactness, so full fp32 is the
# default here; bf16/fp16 models are unaffected, and an explicit setting by the user wins.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
