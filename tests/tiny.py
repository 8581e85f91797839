"""Tiny random verifiers and drafters, built in memory, for fast CPU tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import (
    gemma3,
    gemma3_text,
    gemma4,
    gemma4_text,
    llama,
    qwen3,
    qwen3_5,
    qwen3_5_moe,
    qwen3_next,
)

from mlx_engine.verifier import text_model

VOCAB = 97
WINDOW = 16  # sliding window of the hybrid tiny targets: prompts are longer than this

TARGET_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma3_text": dict(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
        num_attention_heads=4, head_dim=16, num_key_value_heads=1, vocab_size=VOCAB,
        sliding_window=WINDOW, sliding_window_pattern=3, query_pre_attn_scalar=16,
    ),
    "gemma4_text": dict(
        model_type="gemma4_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
        num_attention_heads=4, head_dim=16, global_head_dim=32, num_key_value_heads=1,
        num_kv_shared_layers=2, vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8, sliding_window=WINDOW, sliding_window_pattern=3,
        final_logit_softcapping=30.0, use_double_wide_mlp=False,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, head_dim=16, num_key_value_heads=2, vocab_size=VOCAB,
        rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "llama": dict(
        model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5,
        sliding_window=WINDOW, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    # hybrid: gated-delta (linear attention) layers with a recurrent state, every third layer
    # full attention; loaded, like the real checkpoints, through the multimodal wrapper
    "qwen3_5": dict(
        model_type="qwen3_5", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=3,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
}
# the same hybrid with mixture-of-experts MLPs (Qwen 3.5/3.6 "-A3B"), and Qwen3-Next's
TARGET_CONFIGS["qwen3_5_moe"] = dict(
    TARGET_CONFIGS["qwen3_5"], model_type="qwen3_5_moe", num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32)
TARGET_CONFIGS["qwen3_next"] = dict(
    {k: v for k, v in TARGET_CONFIGS["qwen3_5_moe"].items() if k != "rope_parameters"},
    model_type="qwen3_next", decoder_sparse_step=1, mlp_only_layers=[], rope_theta=10000.0,
    partial_rotary_factor=0.5, max_position_embeddings=4096)
# Gemma 3 as its multimodal checkpoints (4B and up) hold it
TARGET_CONFIGS["gemma3"] = {"model_type": "gemma3", "vocab_size": VOCAB,
                            "text_config": TARGET_CONFIGS["gemma3_text"]}
# Gemma 4 as mlx-community's checkpoints of the README's 26B A4B hold it: the text model inside
# the multimodal wrapper, its layers mixture-of-experts blocks
TARGET_CONFIGS["gemma4"] = {"model_type": "gemma4", "vocab_size": VOCAB, "text_config": dict(
    TARGET_CONFIGS["gemma4_text"], enable_moe_block=True, num_experts=4, top_k_experts=2,
    moe_intermediate_size=32)}
FAMILIES = {"gemma3_text": gemma3_text, "gemma4_text": gemma4_text, "qwen3": qwen3,
            "llama": llama, "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe,
            "qwen3_next": qwen3_next, "gemma3": gemma3, "gemma4": gemma4}


# Random init decodes one token forever unless the embedding scale is tuned per family.
EMBED_SCALE = {"gemma3_text": 4.0, "gemma4_text": 0.25, "qwen3": 4.0, "llama": 4.0,
               "qwen3_5": 4.0, "qwen3_5_moe": 4.0, "qwen3_next": 4.0, "gemma3": 4.0,
               "gemma4": 0.25}


def make_target(family: str, seed: int = 0, vocab: int = VOCAB) -> nn.Module:
    """A random mlx-lm model of `family`, float32, weights materialised."""
    mx.random.seed(seed)
    module = FAMILIES[family]
    config = _with_vocab(TARGET_CONFIGS[family], vocab)
    model = module.Model(module.ModelArgs.from_dict(config))
    text = text_model(model)
    if text.model_type == "gemma4_text":  # mirror load(): drop K/V projections of shared layers
        weights = text.sanitize(dict(tree_flatten(text.parameters())))
        text.load_weights(list(weights.items()), strict=False)
    emb = text.model.embed_tokens
    emb.weight = emb.weight * EMBED_SCALE[family]
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _with_vocab(config: dict[str, Any], vocab: int) -> dict[str, Any]:
    if "text_config" in config:  # a wrapper: Gemma's sets its text model's vocab from its own
        return dict(config, vocab_size=vocab, text_config=_with_vocab(config["text_config"], vocab))
    return dict(config, vocab_size=vocab, vocab_size_per_layer_input=vocab)


def drafter_config(
    target_layers: int, hidden: int = 64, block_size: int = 8, layers: int = 2,
    sliding: bool = True, vocab: int = VOCAB,
) -> dict[str, Any]:
    """A z-lab-format config.json for a random drafter of a tiny target."""
    layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    if not sliding:
        layer_types = ["full_attention"] * layers
    taps = [1, target_layers - 2] if target_layers > 3 else [0, 1]
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "hidden_size": hidden, "intermediate_size": 96, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 4096, "vocab_size": vocab, "layer_types": layer_types,
        "sliding_window": 12, "block_size": block_size, "num_target_layers": target_layers,
        "tie_word_embeddings": False,
        "dflash_config": {"mask_token_id": vocab - 1, "target_layer_ids": taps,
                          "block_size": block_size},
    }


def save_random_drafter(path: Path, config: dict[str, Any], seed: int = 1) -> Path:
    """Write a random drafter in z-lab format (config.json + model.safetensors)."""
    from mlx_engine.drafter import DFlashDrafter
    from mlx_engine.drafter_config import DrafterConfig

    mx.random.seed(seed)
    model = DFlashDrafter(DrafterConfig.from_dict(config))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def prompt_tokens(n: int, seed: int = 0) -> list[int]:
    """A deterministic pseudo-random prompt that avoids the mask token."""
    key = mx.random.key(seed)
    return mx.random.randint(2, VOCAB - 2, shape=(n,), key=key).tolist()


def save_model_dir(path: Path, family: str = "gemma3_text", seed: int = 0) -> Path:
    """An mlx-lm loadable dir: config, weights and a word-level tokenizer over the tiny vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = make_target(family, seed)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(TARGET_CONFIGS[family], eos_token_id=1, bos_token_id=2)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    vocab = {_word(i): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=_word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": _word(1),
        "bos_token": _word(2), "unk_token": _word(0), "model_max_length": 4096,
    }))
    return path


def _word(i: int) -> str:
    return "x" + chr(97 + i // 26) + chr(97 + i % 26)  # letters only: no digit splitting


def words(tokens: list[int]) -> str:
    """Text that the tiny tokenizer encodes back to `tokens`."""
    return " ".join(_word(t) for t in tokens)


def load_script(relative: str) -> ModuleType:
    """A script of the repository's `scripts/` folder, imported as a module (`relative` to it)
    with its own folder on the import path, as `python scripts/...` runs it."""
    path = Path(__file__).parents[1] / "scripts" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def save_pair(root: Path, block_size: int) -> tuple[Path, Path]:
    """A tiny gemma3 target dir and a random drafter dir for it, for the scripts' CLIs."""
    model = save_model_dir(root / "model")
    layers = TARGET_CONFIGS["gemma3_text"]["num_hidden_layers"]
    draft = save_random_drafter(root / "draft", drafter_config(layers, block_size=block_size))
    return model, draft
