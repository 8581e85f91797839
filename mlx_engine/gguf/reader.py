"""Open a GGUF file and read its metadata; mlx-free, so the torch reference reads GGUFs too.

`gguf` (llama.cpp's own package) is imported only when a file is opened: a cache hit, which
every engine start checks, needs none of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlx_engine.errors import UserError


def open_gguf(gguf_path: Path) -> Any:
    """llama.cpp's reader (metadata arrays parsed in bulk): memory-maps the file, so tensors are
    only read when dequantized."""
    from mlx_engine.gguf.bulk_reader import BulkGGUFReader

    try:
        return BulkGGUFReader(gguf_path)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read {gguf_path} as GGUF: {exc}") from exc


def metadata(reader: Any, key: str, default: Any = ...) -> Any:
    """The value of metadata `key`; a missing key without a default means a file we cannot use."""
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise UserError(f"not a Gemma 3 GGUF: metadata {key!r} is missing")
        return default
    return field.contents()


def f32(value: float) -> float:
    """GGUF stores floats as f32: 1e-6 reads back as 9.99999997e-07; write the short decimal."""
    return float(str(np.float32(value)))
