"""A GGUF's block quantization carried into MLX's affine format, bit for bit.

llama.cpp's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks and the 32-weight sub-blocks of Q4_K and Q5_K
all hold each weight as `scale * q + bias` with an unsigned q of 4, 5 or 8 bits (the signed types
with a fixed offset). That is MLX's affine quantization at group size 32 with float32 scales, so
a GGUF model can run on MLX's quantized kernels with the very weight values the file holds instead
of a float32 copy four to eight times its size. Q6_K (groups of 16), the float types and anything
else stay dense. Every tensor is checked against llama.cpp's own dequantization: a mismatch
returns None, never an approximation.
"""

from __future__ import annotations

import numpy as np

GROUP_SIZE = 32


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of every block, as float32."""
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32).ravel()


def _k_quant(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: per 32-weight sub-block scale d * sc and bias -dmin * m (llama.cpp's order)."""
    from gguf.quants import Q4_K

    d, dmin = _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]
    sc, m = Q4_K.get_scale_min(blocks[:, 4 : 4 + Q4_K.K_SCALE_SIZE])
    return (d * sc.astype(np.float32)).ravel(), -(dmin * m.astype(np.float32)).ravel()


def group_affine(qtype: int, blocks: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(bits, scale, bias) per group of 32 weights, in storage order, or None for other types."""
    from gguf import GGMLQuantizationType as T

    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0):  # d * (q - offset), q unsigned
        bits = {T.Q4_0: 4, T.Q5_0: 5, T.Q8_0: 8}[qtype]
        d = _f16(blocks, 0)
        return bits, d, -float(1 << (bits - 1)) * d
    if qtype in (T.Q4_1, T.Q5_1):  # d * q + m
        return (4 if qtype == T.Q4_1 else 5), _f16(blocks, 0), _f16(blocks, 2)
    if qtype in (T.Q4_K, T.Q5_K):
        return (4 if qtype == T.Q4_K else 5), *_k_quant(blocks)
    return None


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: each row's values as one little-endian bit stream of uint32 words.

    32 values fill exactly `bits` words, so each value's word and shift are fixed per position.
    """
    rows, cols = q.shape
    values = q.reshape(rows, cols // 32, 32).astype(np.uint32)
    words = np.zeros((rows, cols // 32, bits), dtype=np.uint32)
    for i in range(32):
        word, shift = divmod(i * bits, 32)
        words[..., word] |= values[..., i] << shift  # bits past 32 fall off here...
        if shift + bits > 32:
            words[..., word + 1] |= values[..., i] >> (32 - shift)  # ...and land here
    return words.reshape(rows, -1)


def quantize_exact(qtype: int, raw: np.ndarray, dense: np.ndarray
                   ) -> tuple[int, dict[str, np.ndarray]] | None:
    """(bits, {weight, scales, biases}) holding exactly `dense`, llama.cpp's dequantization of
    the GGUF tensor `raw` (its blocks as bytes), or None when MLX cannot hold it exactly."""
    import mlx.core as mx
    from gguf import GGML_QUANT_SIZES

    if qtype not in GGML_QUANT_SIZES or dense.ndim != 2 or dense.shape[-1] % GROUP_SIZE:
        return None
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, GGML_QUANT_SIZES[qtype][1])
    affine = group_affine(qtype, blocks)
    groups = dense.reshape(-1, GROUP_SIZE)
    if affine is None or affine[1].size != groups.shape[0]:
        return None
    bits, scale, bias = affine
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (groups - bias[:, None]) / scale[:, None]
    np.rint(q, out=q)
    np.clip(q, 0, (1 << bits) - 1, out=q)
    q[scale == 0] = 0  # a zero scale holds every weight at its bias, whatever q is
    q = q.astype(np.uint8).reshape(dense.shape)
    shape = (dense.shape[0], dense.shape[1] // GROUP_SIZE)
    parts = {"weight": pack(q, bits), "scales": scale.reshape(shape), "biases": bias.reshape(shape)}
    back = mx.dequantize(*(mx.array(parts[k]) for k in ("weight", "scales", "biases")),
                         group_size=GROUP_SIZE, bits=bits)
    return (bits, parts) if mx.array_equal(back, mx.array(dense)).item() else None
