"""kakeya-mlx engine: lossless DFlash speculative decoding on MLX."""

import os

from . import blas

__version__ = "0.1.0"

# Before anything imports MLX: its CPU matmuls bind to the first `cblas_sgemm` they find.
blas.preload()

# Greedy speculative decoding is exact only if a verify block (a GEMM over B rows) computes
# each row's logits as the AR step (a GEMV over one row) does. MLX may run float32 GEMMs, not
# GEMVs, in TF32 (`MLX_ENABLE_TF32`, default on, on CUDA tensor cores and Apple M5), which can
# flip near-tie argmaxes. The float32 paths exist for exactness, so full fp32 is the default;
# bf16/fp16 models are unaffected, and a setting the user made wins (docs/design.md).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# On CUDA, bf16/fp16 attention goes to cuDNN, which builds (and caches) a graph per (query,
# key) shape. AR decoding reuses a few shapes; the speculative loop's keys grow by a different
# amount every round, so with it on nearly every round pays a graph build (docs/design.md).
# Metal and CPU never read this variable.
os.environ.setdefault("MLX_CUDA_USE_CUDNN_SDPA", "0")
