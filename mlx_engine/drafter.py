"""The DFlash block drafter in MLX, loading z-lab-format checkpoints.

A block `[anchor, MASK x (B-1)]` is drafted in one forward. Each layer attends over the
verifier's projected context rows (cached once per committed token, never rolled back) and
the block itself (never cached). Embedding and output head are the target's: a plain lookup
times `input_embedding_scale` (the torch reference's semantics, not Gemma's sqrt(H) scale).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .drafter_config import DRAFT_VOCAB_FILE, DrafterConfig
from .errors import UserError


def block_mask(start: int, size: int, causal: bool, window: int | None) -> mx.array | None:
    """Visibility of [context (start rows) + block] keys for the block's queries."""
    if not causal and window is None:
        return None
    q = mx.arange(start, start + size)[:, None]
    k = mx.arange(start + size)[None]
    visible = mx.ones((size, start + size), dtype=mx.bool_)
    if causal:
        visible = visible & (k <= q)
    if window is not None:
        visible = visible & (q - k < window)
        if not causal:
            visible = visible & (k - q < window)
    return visible


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig, layer_type: str):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.rope = initialize_rope(
            self.head_dim, cfg.rope_theta, False, cfg.rope_scaling, cfg.max_position_embeddings
        )
        sliding = layer_type == "sliding_attention"
        self.causal = sliding if cfg.is_causal is None else bool(cfg.is_causal)
        self.window = cfg.sliding_window if sliding else None

    def _keys_values(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array]:
        B, L, _ = x.shape
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(k, offset=offset), v

    def extend_context(self, ctx: mx.array, cache: KVCache) -> None:
        k, v = self._keys_values(ctx, cache.offset)
        cache.update_and_fetch(k, v)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        start = cache.offset
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=start)
        kb, vb = self._keys_values(x, start)
        kc, vc = cache.keys_and_values()
        keys = mx.concatenate([kc, kb], axis=2)
        values = mx.concatenate([vc, vb], axis=2)
        mask = block_mask(start, L, self.causal, self.window)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DrafterMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig, layer_type: str):
        super().__init__()
        self.self_attn = DrafterAttention(cfg, layer_type)
        self.mlp = DrafterMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.config = cfg
        n_taps = len(cfg.target_layer_ids)
        self.fc = nn.Linear(n_taps * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.layers = [DrafterLayer(cfg, t) for t in cfg.layer_types]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def make_context_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def extend_context(self, taps: mx.array, cache: list[KVCache]) -> None:
        """Append verifier taps ([1, n, n_taps*H]) for the next n committed positions."""
        ctx = self.hidden_norm(self.fc(taps))
        for layer, c in zip(self.layers, cache, strict=True):
            layer.self_attn.extend_context(ctx, c)

    def draft_logits(
        self,
        block_ids: mx.array,
        cache: list[KVCache],
        embed_fn: Callable[[mx.array], mx.array],
        head_fn: Callable[[mx.array], mx.array],
        drafts: int | None = None,
    ) -> mx.array:
        """Logits [1, D, V] for block positions 1..D (position i predicts token i), D =
        `drafts` or B-1: the head scores only the drafts a round will verify."""
        cfg = self.config
        x = embed_fn(block_ids) * cfg.input_embedding_scale
        for layer, c in zip(self.layers, cache, strict=True):
            x = layer(x, c)
        end = None if drafts is None else 1 + drafts
        logits = head_fn(self.norm(x[:, 1:end])) * cfg.output_multiplier
        if cfg.final_logit_softcapping:
            cap = cfg.final_logit_softcapping
            logits = mx.tanh(logits / cap) * cap
        return logits


# --- loading -----------------------------------------------------------------------------
def _read_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(f for f in path.glob("*.safetensors") if f.name != DRAFT_VOCAB_FILE)
    if not files:
        raise UserError(f"drafter dir {path} has no *.safetensors files")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as exc:  # corrupt or truncated file
            raise UserError(f"cannot read drafter weights {f}: {exc}") from None
    return weights


def _check_weights(model: DFlashDrafter, weights: dict[str, mx.array]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"drafter checkpoint is missing tensors {missing[:3]}{more}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise UserError(f"drafter checkpoint has unexpected tensors {unexpected[:3]}")
    for name, w in weights.items():
        if tuple(w.shape) != tuple(expected[name].shape):
            raise UserError(
                f"drafter tensor {name} has shape {tuple(w.shape)}, "
                f"config implies {tuple(expected[name].shape)}"
            )


def load_drafter(path: str | Path) -> DFlashDrafter:
    """Load a local z-lab-format drafter dir (config.json + safetensors, sharded or not)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"drafter dir {path} has no config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"drafter config {config_file} is not valid JSON: {exc}") from None
    model = DFlashDrafter(DrafterConfig.from_dict(cfg))
    weights = _read_weights(path)
    _check_weights(model, weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model
