"""kakeya-mlx engine: lossless DFlash speculative decoding on MLX."""

import os

from . import blas

__version__ = "0.1.0"

# Before anything imports MLX: its CPU matmuls bind to the first `cblas_sgemm` they find.
blas.preload()

# Greedy speculative decoding is exact only if a verify block (a GEMM over B rows) computes
# each row's logits as the AR step (a GEMV over one row) does. MLX may run float32 GEMMs, not
# GEMVs, in TF32 on CUDA tensor cores and Apple M5 Neural Accelerators (`MLX_ENABLE_TF32`,
# default on), which can flip near-tie argmaxes: on an H200 with it on, 2 of 40 float32
# samples diverged from AR (40 of 40 identical with it off). The float32 paths exist for
# exactness, so full fp32 is the default here; bf16/fp16 models are unaffected, and an
# explicit setting by the user wins (for both settings here).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# On CUDA, bf16/fp16 attention goes to cuDNN, which builds (and caches) a new graph for every
# new (query, key) shape. AR decoding reuses a few shapes; the speculative loop's keys grow by
# a different amount every round, so nearly every verify and draft paid a graph build: bf16
# fused ran at 0.55x AR on an H200 with it on, 1.80x with it off (docs/bench.md). Metal and
# CPU never read this variable.
os.environ.setdefault("MLX_CUDA_USE_CUDNN_SDPA", "0")
