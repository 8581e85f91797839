"""Gemma 3 as llama.cpp writes it to GGUF, mapped back to mlx-lm's `gemma3_text`.

The tables invert llama.cpp's gemma3 conversion: tensor names, the config fields it stores as
metadata, and the constants it hard-codes instead. Gemma's norm weights are stored as w + 1.
Everything here is mlx-free (the torch reference loads GGUF targets through it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from mlx_engine.errors import UserError
from mlx_engine.gguf.reader import f32, metadata

# GGUF tensor name -> mlx-lm / Hugging Face parameter name (llama.cpp's gemma3 table, inverted).
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# config.json field -> GGUF metadata key ({arch} is general.architecture).
CONFIG_KEYS = {
    "hidden_size": "{arch}.embedding_length",
    "num_hidden_layers": "{arch}.block_count",
    "intermediate_size": "{arch}.feed_forward_length",
    "num_attention_heads": "{arch}.attention.head_count",
    "num_key_value_heads": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length",
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base",
    "sliding_window": "{arch}.attention.sliding_window",
    "max_position_embeddings": "{arch}.context_length",
}
# What llama.cpp hard-codes for gemma3 instead of storing it in the file.
GEMMA3_CONSTANTS = {
    "rope_local_base_freq": 10_000.0,
    "sliding_window_pattern": 6,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
}
# Gemma's chat turn terminator: generation stops on it as well as on <eos> (HF: eos [1, 106]).
END_OF_TURN = "<end_of_turn>"


def gguf_config(reader: Any, dtype: str = "float32") -> dict[str, Any]:
    """config.json (model_type gemma3_text) from the file's metadata plus llama.cpp's constants."""
    arch = metadata(reader, "general.architecture")
    if arch != "gemma3":
        raise UserError(f"only Gemma 3 GGUF files are supported, this one is {arch!r}")
    config: dict[str, Any] = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    for name, key in CONFIG_KEYS.items():
        config[name] = metadata(reader, key.format(arch=arch))
    for name in ("rms_norm_eps", "rope_theta"):
        config[name] = f32(config[name])
    config.update(GEMMA3_CONSTANTS)
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B (hidden / heads).
    config["query_pre_attn_scalar"] = (
        config["hidden_size"] // config["num_attention_heads"]
        if config["num_hidden_layers"] == 62
        else config["head_dim"]
    )
    pattern = config["sliding_window_pattern"]
    config["layer_types"] = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(config["num_hidden_layers"])
    ]
    config["rope_scaling"] = _rope_scaling(reader, arch)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError("not a Gemma 3 GGUF: tensor 'token_embd.weight' is missing")
    config["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    config["tie_word_embeddings"] = "output.weight" not in tensors

    tokens = metadata(reader, "tokenizer.ggml.tokens")
    eos = [metadata(reader, "tokenizer.ggml.eos_token_id")]
    if END_OF_TURN in tokens and tokens.index(END_OF_TURN) not in eos:
        eos.append(tokens.index(END_OF_TURN))
    config["bos_token_id"] = metadata(reader, "tokenizer.ggml.bos_token_id")
    config["eos_token_id"] = eos
    config["pad_token_id"] = metadata(reader, "tokenizer.ggml.padding_token_id", 0)
    config["torch_dtype"] = dtype
    return config


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    """Gemma 3 4B+ scale global rope linearly; 270M stores no scaling at all."""
    kind = metadata(reader, f"{arch}.rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise UserError(f"unsupported rope scaling {kind!r} in GGUF (only linear)")
    factor = f32(metadata(reader, f"{arch}.rope.scaling.factor"))
    return {"rope_type": "linear", "factor": factor}


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def hf_name(gguf_name: str) -> str:
    """mlx-lm parameter name for a GGUF tensor name."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_TENSORS:
        raise UserError(f"unexpected tensor {gguf_name!r} in a Gemma 3 GGUF")
    return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.weight"


def iter_tensors(reader: Any, progress: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(mlx-lm / HF name, float32 array) one tensor at a time, in `reader.tensors` order."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    for tensor in tqdm(reader.tensors, desc="tensors", unit="tensor", disable=not progress):
        name = hf_name(tensor.name)
        # (out, in): already the Linear layout, no transpose; Gemma's rope is NeoX, no q/k permute.
        value = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name.endswith("norm.weight"):
            value = value - 1.0  # llama.cpp stores Gemma's RMSNorm weight as w + 1
        yield name, value
