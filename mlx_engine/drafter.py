"""The DFlash block drafter in MLX, loading z-lab-format checkpoints.

A block `[anchor, MASK x (B-1)]` is drafted in one forward. Each layer attends over the
verifier's projected context rows (cached once per committed token, never rolled back) and
the block itself (never cached). Embedding and output head are the target's: a plain lookup
times `input_embedding_scale` (the torch semantics; see ../shared/reference/dflash.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .errors import UserError

DRAFT_VOCAB_FILE = "draft_vocab.safetensors"  # optional; read by proposer.load_draft_vocab


def build_target_layer_ids(num_target_layers: int, num_taps: int) -> list[int]:
    """Evenly spread taps over the target, skipping the first and last few layers."""
    if num_taps == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [round(1 + i * span / (num_taps - 1)) for i in range(num_taps)]


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    is_causal: bool | None = None
    attention_bias: bool = False
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> DrafterConfig:
        """Read z-lab's config.json: DFlash fields may sit in `dflash_config` or at top level."""
        dflash = cfg.get("dflash_config") or {}

        def pick(name: str, default: Any = None) -> Any:
            return dflash.get(name, cfg.get(name, default))

        required = ["hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in cfg]
        if pick("mask_token_id") is None:
            missing.append("dflash_config.mask_token_id")
        if missing:
            raise UserError(f"drafter config.json lacks {', '.join(missing)}")
        n_layers = int(cfg["num_hidden_layers"])
        layer_types = list(cfg.get("layer_types") or ["full_attention"] * n_layers)
        if len(layer_types) != n_layers:
            raise UserError(
                f"drafter config has {len(layer_types)} layer_types for {n_layers} layers"
            )
        if "sliding_attention" in layer_types and not cfg.get("sliding_window"):
            raise UserError("drafter config has sliding layers but no sliding_window")
        n_target = cfg.get("num_target_layers")
        tap_ids = pick("target_layer_ids")
        if tap_ids is None:
            if n_target is None:
                raise UserError("drafter config has neither target_layer_ids nor num_target_layers")
            tap_ids = build_target_layer_ids(int(n_target), n_layers)
        heads = int(cfg["num_attention_heads"])
        softcap = pick("final_logit_softcapping")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            vocab_size=int(cfg["vocab_size"]),
            block_size=int(pick("block_size", 16)),
            mask_token_id=int(pick("mask_token_id")),
            target_layer_ids=[int(i) for i in tap_ids],
            num_target_layers=None if n_target is None else int(n_target),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", (rope or {}).get("rope_theta", 1e6))),
            rope_scaling=rope if rope and rope.get("rope_type", rope.get("type")) else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            layer_types=layer_types,
            sliding_window=cfg.get("sliding_window"),
            is_causal=cfg.get("is_causal"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            input_embedding_scale=float(pick("input_embedding_scale", 1.0) or 1.0),
            output_multiplier=float(pick("output_multiplier", 1.0) or 1.0),
            final_logit_softcapping=float(softcap) if softcap else None,
        )


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
    ) -> mx.array:
        """Logits [1, B-1, V] for block positions 1..B-1 (position i predicts token i)."""
        cfg = self.config
        x = embed_fn(block_ids) * cfg.input_embedding_scale
        for layer, c in zip(self.layers, cache, strict=True):
            x = layer(x, c)
        logits = head_fn(self.norm(x[:, 1:])) * cfg.output_multiplier
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


def check_compatible(cfg: DrafterConfig, hidden_size: int, vocab_size: int, n_layers: int) -> None:
    """Refuse a drafter built for another target, naming both values."""
    if cfg.hidden_size != hidden_size:
        raise UserError(
            f"drafter hidden_size {cfg.hidden_size} != verifier hidden_size {hidden_size}"
        )
    if cfg.vocab_size != vocab_size:
        raise UserError(f"drafter vocab_size {cfg.vocab_size} != verifier vocab_size {vocab_size}")
    if not 0 <= cfg.mask_token_id < vocab_size:
        raise UserError(
            f"drafter mask_token_id {cfg.mask_token_id} is outside the verifier vocab {vocab_size}"
        )
    if cfg.num_target_layers is not None and cfg.num_target_layers != n_layers:
        raise UserError(
            f"drafter was built for {cfg.num_target_layers} target layers, verifier has {n_layers}"
        )
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"drafter target_layer_ids {bad} are not < verifier layers {n_layers}")
