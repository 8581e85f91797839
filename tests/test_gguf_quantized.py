"""GGUF block quantization -> MLX affine: exact for the types it claims, None for the rest."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from mlx_engine.gguf.quantized import GROUP_SIZE, quantize_exact

ROWS, COLS = 8, 512


def random_blocks(qtype: T, seed: int) -> np.ndarray:
    """Raw rows of `qtype` blocks: random bytes, with finite float16 scales (d, dmin)."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS * COLS // block, size), dtype=np.uint8)
    halves = np.abs(rng.normal(size=(raw.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        raw[:, -2:] = halves[:, :2]  # its one d comes last
    else:
        raw[:, :4] = halves  # d, dmin first
    return raw.reshape(ROWS, -1)


def mlx_dequantized(bits: int, parts: dict[str, np.ndarray]) -> np.ndarray:
    arrays = (mx.array(parts[k]) for k in ("weight", "scales", "biases"))
    return np.array(mx.dequantize(*arrays, group_size=GROUP_SIZE, bits=bits))


@pytest.mark.parametrize(("qtype", "bits"), [(T.Q4_0, 4), (T.Q4_1, 4), (T.Q5_0, 5),
                                             (T.Q5_1, 5), (T.Q8_0, 8)])
def test_legacy_types_are_held_bit_for_bit(qtype: T, bits: int) -> None:
    weights = np.random.default_rng(bits).normal(size=(ROWS, COLS)).astype(np.float32)
    raw = quantize(weights, qtype)
    dense = dequantize(raw, qtype)
    got = quantize_exact(qtype, raw, dense)
    assert got is not None
    assert got[0] == bits
    assert got[1]["weight"].shape == (ROWS, COLS * bits // 32)
    assert got[1]["scales"].dtype == np.float32
    np.testing.assert_array_equal(mlx_dequantized(*got), dense)


@pytest.mark.parametrize(("qtype", "bits"), [(T.Q4_K, 4), (T.Q5_K, 5)])
def test_k_quants_are_held_bit_for_bit(qtype: T, bits: int) -> None:
    raw = random_blocks(qtype, seed=bits)
    dense = dequantize(raw, qtype)
    got = quantize_exact(qtype, raw, dense)
    assert got is not None and got[0] == bits
    np.testing.assert_array_equal(mlx_dequantized(*got), dense)


def test_what_mlx_cannot_hold_stays_dense() -> None:
    q6 = random_blocks(T.Q6_K, seed=6)  # groups of 16: no MLX group size fits
    assert quantize_exact(T.Q6_K, q6, dequantize(q6, T.Q6_K)) is None
    f16 = np.ones((ROWS, COLS), dtype=np.float16)
    assert quantize_exact(T.F16, f16, f16.astype(np.float32)) is None
    raw = quantize(np.ones((ROWS, COLS), dtype=np.float32), T.Q8_0)
    off_by_one_ulp = np.nextafter(dequantize(raw, T.Q8_0), np.float32(2))
    assert quantize_exact(T.Q8_0, raw, off_by_one_ulp) is None
