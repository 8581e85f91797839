"""Where converted models live, and when a directory there is a finished conversion.

The layout and the marker's keys are a contract with every populated cache
(`~/.cache/kakeya-mlx/<stem>-<dtype>[-gguf-quantized]/kakeya_source.json`): change them only
with `CONVERTER_VERSION`, which turns every old entry into a miss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONVERTER_VERSION = 1
MARKER = "kakeya_source.json"
DEFAULT_STEM = "gemma3-270m"  # the default verifier's name in the cache
WEIGHTS = "model.safetensors"
REQUIRED_FILES = ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """Where converted models live: $KAKEYA_CACHE_DIR, else the XDG cache dir."""
    if override := os.environ.get("KAKEYA_CACHE_DIR"):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kakeya-mlx"


def cache_dir(stem: str, dtype: str, keep_quantization: bool = False) -> Path:
    """Where a conversion lives in the cache unless `--out` says otherwise."""
    return cache_root() / f"{stem}-{dtype}{'-gguf-quantized' if keep_quantization else ''}"


def is_cache_hit(out_dir: Path, dtype: str, gguf_sha256: str, keep_quantization: bool = False
                 ) -> bool:
    """True when `out_dir` is a finished conversion of that GGUF to that form by this converter.

    Cheap on purpose (no re-hashing of the weights): it runs on every engine start. Sizes catch a
    file truncated after the fact; the atomic rename already rules out a half-written directory.
    """
    marker = read_marker(out_dir)
    if marker is None:
        return False
    if (
        marker.get("converter_version") != CONVERTER_VERSION
        or marker.get("dtype") != dtype
        or marker.get("gguf_sha256") != gguf_sha256
        or marker.get("keep_quantization", False) != keep_quantization
    ):
        return False
    if not all((out_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    return (out_dir / WEIGHTS).stat().st_size == marker.get("weights_bytes")


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_replaceable(out_dir: Path) -> bool:
    """Missing, empty, or written by this converter: never delete a directory a user made."""
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    return (out_dir / MARKER).is_file() or not any(out_dir.iterdir())
