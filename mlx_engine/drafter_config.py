"""DFlash drafter config (z-lab's config.json) and target compatibility, free of mlx and torch.

Both the MLX drafter and the torch reference read checkpoints through this one parser, so
the two can never disagree on what a config means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

DRAFT_VOCAB_FILE = "draft_vocab.safetensors"  # optional token subset; not a weight file


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
