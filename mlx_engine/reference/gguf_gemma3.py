"""Load a Gemma 3 text GGUF straight into transformers' `Gemma3ForCausalLM` (no mlx needed).

Training runs where torch is, and MLX may not be; transformers' own GGUF path needs
`accelerate` and parses the metadata slowly. The mlx-free half of `mlx_engine/gguf/` (config
from the metadata, dequantized tensors with llama.cpp's Gemma conventions undone) reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..gguf.gemma3 import gguf_config, iter_tensors
from ..gguf.reader import open_gguf


def load_gemma3_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A float `Gemma3ForCausalLM` (eval mode, CPU) with the GGUF's dequantized weights."""
    try:
        import gguf  # noqa: F401  (the reader the converter uses)
    except ImportError:
        raise UserError("reading a GGUF target needs the `gguf` package") from None
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    reader = open_gguf(Path(path))
    raw = {k: v for k, v in gguf_config(reader).items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    config = Gemma3TextConfig(**raw)
    weights = {name: torch.from_numpy(w) for name, w in iter_tensors(reader)}
    model = Gemma3ForCausalLM(config)
    missing = sorted(set(model.state_dict()) - set(weights) - {"lm_head.weight"})
    if missing:
        raise UserError(f"GGUF {path} lacks tensors {missing[:3]}")
    model.load_state_dict(weights, strict=False)
    return model.to(dtype).eval()
