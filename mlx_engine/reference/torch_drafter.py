"""The DFlash block drafter in torch, in the z-lab checkpoint format (reference + training).

Same semantics as `mlx_engine/drafter.py` (z-lab `dflash` 0.1.0's): the target's
tapped hidden states are projected once per context row (`hidden_norm(fc(taps))`) and only
ever enter attention as keys/values; a block `[anchor, MASK x (B-1)]` is embedded by a plain
lookup in the target's embedding matrix, and block position i predicts the token at
`start + i` through the target's own output head.

One forward serves training (many anchors per sequence, each block seeing only the context
before its anchor through a block-sparse mask) and inference (a context K/V cache plus one
block), so both paths share every weight-touching line. The config.json parser and the
target-compatibility checks are `mlx_engine/drafter_config.py`, shared with the MLX drafter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..drafter_config import DRAFT_VOCAB_FILE, DrafterConfig
from ..errors import UserError

SHARD_BYTES = 15 * 2**20  # exported shards stay < 16 MiB (the device's file-transfer limit)


def check_supported(cfg: DrafterConfig) -> None:
    """What the torch reference does not implement, or cannot mean anything."""
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", "default") != "default":
        raise UserError(f"drafter rope_scaling {cfg.rope_scaling} is not supported by the torch "
                        "reference (plain RoPE only)")
    if cfg.attention_bias:
        raise UserError("drafter attention_bias true is not supported (z-lab drafters have none)")
    unknown = sorted(set(cfg.layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UserError(f"drafter config has unknown layer_types {unknown}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UserError(
            f"drafter num_attention_heads {cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {cfg.num_key_value_heads}"
        )
    if cfg.block_size < 2:
        raise UserError(f"drafter block_size {cfg.block_size} must be at least 2")


def config_dict(cfg: DrafterConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of a z-lab checkpoint (what `DrafterConfig.from_dict` reads back)."""
    dflash: dict[str, Any] = {
        "mask_token_id": cfg.mask_token_id,
        "target_layer_ids": list(cfg.target_layer_ids),
        "block_size": cfg.block_size,
    }
    if cfg.input_embedding_scale != 1.0:
        dflash["input_embedding_scale"] = cfg.input_embedding_scale
    if cfg.output_multiplier != 1.0:
        dflash["output_multiplier"] = cfg.output_multiplier
    if cfg.final_logit_softcapping:
        dflash["final_logit_softcapping"] = cfg.final_logit_softcapping
    out: dict[str, Any] = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "layer_types": _layer_types(cfg),
        "sliding_window": cfg.sliding_window,
        "block_size": cfg.block_size,
        "num_target_layers": cfg.num_target_layers,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dflash_config": dflash,
    }
    if cfg.is_causal is not None:
        out["is_causal"] = cfg.is_causal
    return out


def _layer_types(cfg: DrafterConfig) -> list[str]:
    return list(cfg.layer_types) or ["full_attention"] * cfg.num_hidden_layers


# --- building blocks ---------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: `x * w` (not Gemma's `1 + w`), statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX (rotate-half) RoPE of x [b, h, n, d] at absolute positions pos [b, n] or [n]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = pos.to(torch.float32)[..., None] * inv_freq  # [(b,) n, d/2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if cos.dim() == 3:  # per-row positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x32 = x.float()
    half = d // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def block_mask(
    anchors: torch.Tensor,
    block_size: int,
    ctx_len: int,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """Visibility [b, 1, nA*B, ctx_len + nA*B] of keys `[context rows ; blocks]` for blocks.

    Block g starts at `anchors[:, g]` and sees the context rows before its anchor plus its
    own rows (all of them, or the earlier ones when causal); blocks never see each other.
    A sliding window limits `query_pos - key_pos` (both ways when not causal), as in z-lab.
    """
    b, n_blocks = anchors.shape
    device = anchors.device
    offs = torch.arange(block_size, device=device)
    q_anchor = anchors.repeat_interleave(block_size, dim=1)  # [b, nq]
    q_pos = q_anchor + offs.repeat(n_blocks)  # [b, nq]
    c_pos = torch.arange(ctx_len, device=device)
    ctx = c_pos[None, None, :] < q_anchor[..., None]  # [b, nq, nc]
    q_blk = torch.arange(n_blocks, device=device).repeat_interleave(block_size)
    blk = (q_blk[:, None] == q_blk[None, :]).expand(b, -1, -1)  # [b, nq, nq]
    if causal:
        blk = blk & (q_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        ctx = ctx & (q_pos[..., None] - c_pos < window)
        delta = q_pos[:, :, None] - q_pos[:, None, :]
        blk = blk & (delta < window)
        if not causal:
            blk = blk & (-delta < window)
    return torch.cat([ctx, blk], dim=-1)[:, None]


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig, layer_type: str):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.theta = cfg.rope_theta
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        sliding = layer_type == "sliding_attention"
        self.causal = sliding if cfg.is_causal is None else bool(cfg.is_causal)
        self.window = cfg.sliding_window if sliding else None

    def keys_values(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped, normed keys and values [b, kv_heads, n, d] of rows h at positions pos."""
        b, n, _ = h.shape
        k = self.k_norm(self.k_proj(h).view(b, n, self.n_kv_heads, self.head_dim))
        v = self.v_proj(h).view(b, n, self.n_kv_heads, self.head_dim)
        return apply_rope(k.transpose(1, 2), pos, self.theta), v.transpose(1, 2)

    def forward(
        self,
        a: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        b, n, _ = a.shape
        q = self.q_norm(self.q_proj(a).view(b, n, self.n_heads, self.head_dim))
        q = apply_rope(q.transpose(1, 2), pos, self.theta)
        kb, vb = self.keys_values(a, pos)
        k = torch.cat([ctx_k.expand(b, -1, -1, -1), kb], dim=2)
        v = torch.cat([ctx_v.expand(b, -1, -1, -1), vb], dim=2)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DrafterMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig, layer_type: str):
        super().__init__()
        self.self_attn = DrafterAttention(cfg, layer_type)
        self.mlp = DrafterMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx_k, ctx_v, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class ContextCache:
    """Per-layer keys/values of the projected context rows; block rows are never cached."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    offset: int = 0


# --- the drafter -------------------------------------------------------------------------
class TorchDFlashDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.config = cfg
        n_taps = len(cfg.target_layer_ids)
        self.fc = nn.Linear(n_taps * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        check_supported(cfg)
        self.layers = nn.ModuleList(DrafterLayer(cfg, t) for t in _layer_types(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Qwen3's init: N(0, std) linears, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def _run_layers(
        self,
        x: torch.Tensor,
        ctx_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        pos: torch.Tensor,
        masks: dict[tuple[bool, int | None], torch.Tensor],
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            ctx_k, ctx_v = ctx_kv(i)
            x = layer(x, ctx_k, ctx_v, pos, masks[(attn.causal, attn.window)])
        return self.norm(x)

    def _masks(
        self, anchors: torch.Tensor, block_size: int, ctx_len: int
    ) -> dict[tuple[bool, int | None], torch.Tensor]:
        kinds = {(layer.self_attn.causal, layer.self_attn.window) for layer in self.layers}
        return {k: block_mask(anchors, block_size, ctx_len, *k) for k in kinds}

    def forward(
        self, taps: torch.Tensor, block_embeds: torch.Tensor, anchors: torch.Tensor
    ) -> torch.Tensor:
        """Training forward: normed hidden [b, nA*B, H] of many blocks per sequence at once.

        taps [b, L, n_taps*H] are the target's taps of rows 0..L-1; block_embeds [b, nA*B, H]
        are the embedded blocks, block g starting at absolute position anchors[:, g] and
        seeing only the context rows before it.
        """
        b, n_ctx, _ = taps.shape
        block_size = block_embeds.shape[1] // anchors.shape[1]
        ctx = self.hidden_norm(self.fc(taps))
        ctx_pos = torch.arange(n_ctx, device=taps.device)
        offs = torch.arange(block_size, device=taps.device)
        pos = (anchors[..., None] + offs).reshape(b, -1)
        masks = self._masks(anchors, block_size, n_ctx)

        def ctx_kv(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.layers[i].self_attn.keys_values(ctx, ctx_pos)

        return self._run_layers(block_embeds, ctx_kv, pos, masks)

    def compute_logits(
        self, hidden: torch.Tensor, head_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Target head, then the drafter's own multiplier and optional soft-cap."""
        cfg = self.config
        logits = head_fn(hidden) * cfg.output_multiplier
        if cfg.final_logit_softcapping:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- inference: the same API as the MLX drafter ----------------------------------------
    def make_context_cache(self) -> ContextCache:
        n = len(self.layers)
        return ContextCache([None] * n, [None] * n)

    @torch.no_grad()
    def extend_context(self, taps: torch.Tensor, cache: ContextCache) -> None:
        """Append target taps ([1, n, n_taps*H]) of the next n committed positions."""
        ctx = self.hidden_norm(self.fc(taps))
        pos = torch.arange(cache.offset, cache.offset + taps.shape[1], device=taps.device)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(ctx, pos)
            old_k, old_v = cache.keys[i], cache.values[i]
            cache.keys[i] = k if old_k is None else torch.cat([old_k, k], dim=2)
            cache.values[i] = v if old_v is None else torch.cat([old_v, v], dim=2)
        cache.offset += taps.shape[1]

    @torch.no_grad()
    def draft_logits(
        self,
        block_ids: torch.Tensor,
        cache: ContextCache,
        embed_fn: Callable[[torch.Tensor], torch.Tensor],
        head_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Logits [1, B-1, V] for block positions 1..B-1 (position i predicts token i)."""
        if cache.offset == 0:
            raise UserError("the drafter needs at least one context row before drafting")
        cfg = self.config
        x = embed_fn(block_ids) * cfg.input_embedding_scale
        block_size = block_ids.shape[1]
        anchors = torch.tensor([[cache.offset]], device=block_ids.device)
        pos = cache.offset + torch.arange(block_size, device=block_ids.device)
        masks = self._masks(anchors, block_size, cache.offset)

        def ctx_kv(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return cache.keys[i], cache.values[i]

        h = self._run_layers(x, ctx_kv, pos, masks)
        return self.compute_logits(h[:, 1:], head_fn)

    # --- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> TorchDFlashDrafter:
        """Load a local z-lab-format drafter dir (config.json + safetensors, sharded or not)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"drafter dir {path} has no config.json")
        try:
            cfg = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"drafter config {config_file} is not valid JSON: {exc}") from None
        model = cls(DrafterConfig.from_dict(cfg))
        weights = _read_weights(path)
        _check_weights(model, weights)
        model.load_state_dict(weights)
        model.to(device=device, dtype=dtype or torch.float32)
        return model

    def save_pretrained(
        self,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        max_shard_bytes: int = SHARD_BYTES,
    ) -> list[Path]:
        """Write config.json + safetensors shards of at most max_shard_bytes (+ HF index)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for stale in [*path.glob("*.safetensors"), path / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)
        tensors = {
            k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()
        }
        if dtype == torch.float16:
            peak = max(t.abs().max().item() for t in tensors.values())
            if peak > torch.finfo(torch.float16).max:
                raise UserError(f"a weight of magnitude {peak:.3g} overflows float16; use bfloat16")
        shards = _shard(tensors, max_shard_bytes)
        dtype_name = str(dtype).removeprefix("torch.")
        config = config_dict(self.config, dtype_name)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        n = len(shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        if n == 1:
            names = ["model.safetensors"]
        else:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s},
            }
            (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, str(path / name), metadata={"format": "pt"})
        return [path / n for n in names]


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy in name order; safetensors' header is small, so keep 64 KiB of slack per shard."""
    budget = max_bytes - 2**16
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.nbytes > budget:
            raise UserError(f"drafter tensor {name} ({t.nbytes} bytes) exceeds the shard limit")
        if size + t.nbytes > budget and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(f for f in path.glob("*.safetensors") if f.name != DRAFT_VOCAB_FILE)
    if not files:
        raise UserError(f"drafter dir {path} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as exc:  # corrupt or truncated file
            raise UserError(f"cannot read drafter weights {f}: {exc}") from None
    return weights


def _check_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
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
