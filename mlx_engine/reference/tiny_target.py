"""A tiny random Gemma 3 target with a byte-level tokenizer, for CPU smoke runs and tests.

Saved as an ordinary HF dir (config.json + model.safetensors + tokenizer files), so the
training CLI, transformers and mlx-lm all load the very same model. The vocabulary mirrors
Gemma's layout: pad/eos/bos/unk first, then `<unusedN>` rows (the mask token comes from
those), then the 256 byte symbols.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB_SIZE = 512
CONFIG = dict(
    hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
    sliding_window_pattern=3, max_position_embeddings=4096, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, rms_norm_eps=1e-6, vocab_size=VOCAB_SIZE,
    bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh", initializer_range=0.1,
)
# With tied embeddings and the default init a random model repeats one token forever; small
# embeddings under larger layer weights give greedy continuations with some variety.
EMBED_STD = 0.1


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n_unused = VOCAB_SIZE - len(SPECIALS) - 256
    names = SPECIALS + [f"<unused{i}>" for i in range(n_unused)]
    vocab = {name: i for i, name in enumerate(names)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(names)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", add_bos_token=True,
    )


def build_tiny_target(path: str | Path, seed: int = 0) -> Path:
    """Write a random tiny Gemma 3 (hidden 64, 6 layers, window 16, vocab 512) to path."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = Path(path)
    n = CONFIG["num_hidden_layers"]
    pattern = CONFIG["sliding_window_pattern"]
    layer_types = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
    ]
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**CONFIG, layer_types=layer_types))
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(std=EMBED_STD)
    model.save_pretrained(str(path))
    # mlx-lm reads the pre-v5 rope/window keys; transformers v5 writes rope_parameters only.
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.update({k: CONFIG[k] for k in ("rope_theta", "rope_local_base_freq",
                                          "sliding_window_pattern", "query_pre_attn_scalar")})
    config_file.write_text(json.dumps(config, indent=2))
    _tokenizer().save_pretrained(str(path))
    return path
