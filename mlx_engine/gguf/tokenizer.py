"""tokenizer.json + tokenizer_config.json rebuilt from a Gemma GGUF's vocabulary.

transformers' `get_gguf_tokenizer` imports torch; its builders do not, so the metadata is read
with `gguf` and renamed with transformers' own key table before handing it to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_engine.errors import UserError
from mlx_engine.gguf.reader import metadata


def write_tokenizer(reader: Any, out_dir: Path) -> None:
    """Write the tokenizer files mlx-lm's `load` reads into `out_dir`."""
    try:
        from transformers import GemmaTokenizer
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        # transformers <= 5.17 keeps an older builder that makes a Unigram tokenizer which
        # mlx-lm cannot detokenize: refuse it rather than build a different tokenizer.
        import transformers

        raise UserError(f"building the tokenizer needs transformers >= 5.18, not "
                        f"{transformers.__version__}: pip install -U transformers") from None

    def renamed(group: str) -> dict[str, Any]:
        table = GGUF_TOKENIZER_MAPPING[group]
        return {name: metadata(reader, f"tokenizer.{key}", None) for key, name in table.items()}

    tokenizer_dict = {k: v for k, v in renamed("tokenizer").items() if v is not None}
    tokenizer_config = {k: v for k, v in renamed("tokenizer_config").items() if v is not None}
    tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece
    tokens = tokenizer_dict["tokens"]
    for special in ("bos", "eos", "unk", "pad"):
        token_id = tokenizer_dict.get(f"{special}_token_id")
        if token_id is not None:
            tokenizer_config[f"{special}_token"] = tokens[token_id]

    arch = metadata(reader, "general.architecture")
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    tokenizer = GemmaTokenizer(tokenizer_object=backend, **tokenizer_config, **extra)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 leaves these flags out (its post-processor adds BOS); 4.x reads them.
    path = out_dir / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in tokenizer_config:
            saved[flag] = tokenizer_config[flag]
    path.write_text(json.dumps(saved, indent=2) + "\n")
