"""GGUF -> mlx-lm converter: a tiny synthetic Gemma 3 GGUF (fast tests), the PyPI one (slow)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten
from tiny import drafter_config, save_random_drafter

from mlx_engine.engine import Engine
from mlx_engine.errors import UserError
from mlx_engine.gguf import convert
from mlx_engine.gguf.cache import CONVERTER_VERSION, MARKER, WEIGHTS, cache_root, is_cache_hit
from mlx_engine.gguf.cli import main
from mlx_engine.gguf.gemma3 import hf_name
from mlx_engine.gguf.reader import open_gguf
from mlx_engine.policy import FixedWidth
from mlx_engine.proposer import DFlashDraftSource
from mlx_engine.speculative import ar_stream, collect, fused_stream

T = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, WINDOW = 64, 2, 1, 32, 128, 6, 8
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz():,.=", "▁d", "de", "def", "▁def", "▁i", "is", "▁is"]
PIECES += ["he", "ll", "llo", "hel", "hello", "▁hello", "wo", "or", "world", "▁world", "re", "▁re"]
# Per-layer tensors: GGUF short name -> (shape as (out, in), stored type).
LAYER_SPEC = {
    "attn_q": ((HEADS * HEAD_DIM, HIDDEN), T.Q5_0),
    "attn_k": ((KV_HEADS * HEAD_DIM, HIDDEN), T.F16),
    "attn_v": ((KV_HEADS * HEAD_DIM, HIDDEN), T.BF16),
    "attn_output": ((HIDDEN, HEADS * HEAD_DIM), T.F32),
    "attn_q_norm": ((HEAD_DIM,), T.F32),
    "attn_k_norm": ((HEAD_DIM,), T.F32),
    "attn_norm": ((HIDDEN,), T.F32),
    "post_attention_norm": ((HIDDEN,), T.F32),
    "ffn_norm": ((HIDDEN,), T.F32),
    "post_ffw_norm": ((HIDDEN,), T.F32),
    "ffn_gate": ((FFN, HIDDEN), T.Q8_0),
    "ffn_up": ((FFN, HIDDEN), T.Q4_0),
    "ffn_down": ((HIDDEN, FFN), T.F16),
}


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Gemma-shaped: specials, <end_of_turn> at 106, byte fallback tokens, a few pieces."""
    tokens = SPECIALS + [f"<unused{i}>" for i in range(5, 105)]
    tokens += ["<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3] + [3] * 102
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += PIECES
    types += [1] * len(PIECES)
    return tokens, types


VOCAB_SIZE = len(tiny_vocab()[0])


def _store(writer: gguf.GGUFWriter, name: str, value: np.ndarray, qtype: T) -> np.ndarray:
    """Write `value` as `qtype`; return what a reader dequantizes it back to."""
    if qtype == T.F32:
        writer.add_tensor(name, value)
        return value
    if qtype == T.F16:
        writer.add_tensor(name, value.astype(np.float16))
        return value.astype(np.float16).astype(np.float32)
    data = quantize(value, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
    return dequantize(data, qtype)


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 6-layer Gemma 3 GGUF as llama.cpp lays one out; returns what it stores, by GGUF name."""
    rng = np.random.default_rng(0)
    tokens, types = tiny_vocab()
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(WINDOW)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)

    def rand(shape: tuple[int, ...], norm: bool) -> np.ndarray:
        # Norms are stored as w + 1 by llama.cpp, so they sit around 1.
        return (rng.normal(size=shape) * 0.1 + (1.0 if norm else 0.0)).astype(np.float32)

    stored = {}
    stored["token_embd.weight"] = _store(
        writer, "token_embd.weight", rand((len(tokens), HIDDEN), False), T.Q8_0
    )
    stored["output_norm.weight"] = _store(
        writer, "output_norm.weight", rand((HIDDEN,), True), T.F32
    )
    for i in range(LAYERS):
        for short, (shape, qtype) in LAYER_SPEC.items():
            name = f"blk.{i}.{short}.weight"
            stored[name] = _store(writer, name, rand(shape, short.endswith("norm")), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny-mlx"
    assert convert.convert_gguf(tiny[0], out, progress=False) == out.absolute()
    return out


@pytest.fixture
def cache(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The default verifier redirected to the tiny GGUF in a private cache; counts conversions."""
    monkeypatch.setenv("KAKEYA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(convert, "default_gguf_path", lambda: tiny[0])
    monkeypatch.setattr(convert, "default_gguf_sha256", lambda: sha256(tiny[0]))
    calls = {"convert": 0, "root": tmp_path / "cache"}
    real = convert._convert

    def counting(*args, **kwargs):
        calls["convert"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_convert", counting)
    return calls


def test_weights_mapped_and_norms_shifted(tiny, converted: Path) -> None:
    from mlx_lm import load

    _, stored = tiny
    model, _ = load(str(converted))
    params = dict(tree_flatten(model.parameters()))
    assert "lm_head.weight" not in params  # tied: the embedding is the head
    assert len(params) == len(stored) == 2 + LAYERS * len(LAYER_SPEC)
    for name, value in stored.items():
        got = np.array(params[hf_name(name)])
        want = value - 1.0 if name.endswith("norm.weight") else value
        np.testing.assert_array_equal(got, want, err_msg=name)
    # Spot-check the table itself, not just hf_name's consistency with it.
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert hf_name("blk.0.post_ffw_norm.weight") == (
        "model.layers.0.post_feedforward_layernorm.weight"
    )
    assert hf_name("blk.5.attn_output.weight") == "model.layers.5.self_attn.o_proj.weight"
    norm = np.array(params["model.norm.weight"])
    assert abs(norm.mean()) < 0.1  # around 0, not around 1
    logits = model(mx.array([[2, 400, 401, 402]]))
    assert logits.shape == (1, 4, len(tiny_vocab()[0]))
    assert np.isfinite(np.array(logits)).all()


def test_config(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    expected = {
        "model_type": "gemma3_text",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "query_pre_attn_scalar": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 256,
        "vocab_size": len(tiny_vocab()[0]),
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "rope_scaling": None,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    }
    assert {k: config.get(k) for k in expected} == expected
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]


def test_tokenizer_and_marker(tiny, converted: Path) -> None:
    from mlx_lm import load

    _, tokenizer = load(str(converted))
    assert tokenizer.eos_token_ids == {1, 106}
    assert tokenizer.bos_token_id == 2
    text = "def hello(world): is re 1.5 ü"  # pieces, merges, and bytes that need fallback
    ids = tokenizer.encode(text)
    assert ids[0] == 2
    assert tokenizer.decode(ids[1:]) == text
    assert len(ids) < len(text.encode())  # merges were rebuilt, not just bytes
    assert tokenizer.encode("<end_of_turn>", add_special_tokens=False) == [106]

    marker = json.loads((converted / MARKER).read_text())
    assert marker == {
        "source": "tiny-gemma3.gguf",
        "gguf_sha256": sha256(tiny[0]),
        "dtype": "float32",
        "keep_quantization": False,
        "converter_version": CONVERTER_VERSION,
        "weights_sha256": sha256(converted / "model.safetensors"),
        "weights_bytes": (converted / "model.safetensors").stat().st_size,
    }
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]
    umask = os.umask(0)
    os.umask(umask)
    assert converted.stat().st_mode & 0o777 == 0o777 & ~umask  # not a temp dir's 0700


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype(tiny, tmp_path: Path, dtype: str) -> None:
    from mlx_lm import load

    out = convert.convert_gguf(tiny[0], tmp_path / "m", dtype=dtype, progress=False)
    model, _ = load(str(out))
    assert model.model.embed_tokens.weight.dtype == getattr(mx, dtype)
    assert json.loads((out / MARKER).read_text())["dtype"] == dtype
    with pytest.raises(UserError, match="unsupported dtype"):
        convert.convert_gguf(tiny[0], tmp_path / "x", dtype="int8")


# Layers the tiny GGUF stores quantized, with the bits MLX holds them in (Q8_0, Q5_0, Q4_0).
KEPT_BITS = {"model.embed_tokens": 8} | {
    f"model.layers.{i}.{name}": bits for i in range(LAYERS)
    for name, bits in (("self_attn.q_proj", 5), ("mlp.gate_proj", 8), ("mlp.up_proj", 4))
}


@pytest.fixture(scope="module")
def kept(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kept") / "tiny-mlx-q"
    return convert.convert_gguf(tiny[0], out, progress=False, keep_quantization=True)


def test_keep_quantization_holds_the_dense_values(tiny, converted: Path, kept: Path) -> None:
    from mlx_lm import load

    config = json.loads((kept / "config.json").read_text())
    layers = {k: v["bits"] for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert layers == KEPT_BITS  # the F16, BF16 and F32 layers stay dense
    quantized, _ = load(str(kept))
    dense, _ = load(str(converted))
    got = dict(tree_flatten(quantized.parameters()))
    for name, want in tree_flatten(dense.parameters()):
        module = name.removesuffix(".weight")
        value = got[name]
        if module in layers:
            value = mx.dequantize(value, got[f"{module}.scales"], got[f"{module}.biases"],
                                  group_size=32, bits=layers[module])
        assert mx.array_equal(value, want), name
    ids = mx.array([[2, 400, 401, 402]])
    np.testing.assert_allclose(np.array(quantized(ids)), np.array(dense(ids)), atol=1e-4)
    assert (kept / WEIGHTS).stat().st_size < (converted / WEIGHTS).stat().st_size

    digest = sha256(tiny[0])
    assert json.loads((kept / MARKER).read_text())["keep_quantization"] is True
    assert is_cache_hit(kept, "float32", digest, keep_quantization=True)
    assert not is_cache_hit(kept, "float32", digest)
    assert not is_cache_hit(converted, "float32", digest, keep_quantization=True)


def test_kept_quantization_decodes_losslessly(kept: Path, tmp_path: Path) -> None:
    draft = save_random_drafter(tmp_path / "draft", drafter_config(LAYERS, vocab=VOCAB_SIZE))
    engine = Engine.load(str(kept), str(draft))
    assert engine.model_info.dtype == "float32"
    prompt = [2, *range(300, 340)]  # 41 tokens: five sliding windows
    source = DFlashDraftSource(engine.drafter, engine.verifier, engine.draft_head)
    ar = collect(ar_stream(engine.verifier, prompt, 48))
    assert collect(fused_stream(engine.verifier, source, prompt, 48, FixedWidth(8))) == ar


def test_keep_quantization_cli(cache: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["--keep-quantization", "--quiet"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == cache["root"] / "gemma3-270m-float32-gguf-quantized"
    assert "quantization" in json.loads((out / "config.json").read_text())
    assert main(["--keep-quantization", "--dtype", "bfloat16", "--quiet"]) == 2
    assert "needs --dtype float32" in capsys.readouterr().err


def test_default_quantized_model_spec(cache: dict) -> None:
    from mlx_engine.sources import resolve_model

    out = resolve_model("default-quantized", "float32")
    assert out == cache["root"] / "gemma3-270m-float32-gguf-quantized"
    assert json.loads((out / MARKER).read_text())["keep_quantization"] is True
    assert resolve_model("default-quantized", "float32") == out and cache["convert"] == 1
    with pytest.raises(UserError, match="computes in float32"):
        resolve_model("default-quantized", "bfloat16")
    engine = Engine.load("default-quantized", draft=None)  # float32 on any device
    assert (engine.model_info.path, engine.model_info.dtype) == (out, "float32")
    assert resolve_model("default", "float32") != out and cache["convert"] == 2


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAKEYA_CACHE_DIR", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "k"
    monkeypatch.delenv("KAKEYA_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "kakeya-mlx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "kakeya-mlx"


def test_default_dir_converts_once(cache: dict) -> None:
    out = convert.default_verifier_dir(progress=False)
    assert out == cache["root"] / "gemma3-270m-float32"
    assert cache["convert"] == 1
    mtime = (out / MARKER).stat().st_mtime_ns
    assert convert.default_verifier_dir(progress=False) == out
    assert cache["convert"] == 1  # a cache hit: nothing converted, nothing rewritten
    assert (out / MARKER).stat().st_mtime_ns == mtime
    convert.default_verifier_dir("bfloat16", progress=False)
    assert cache["convert"] == 2  # each dtype is its own cache entry


def test_invalid_cache_is_not_a_hit(cache: dict) -> None:
    out = convert.default_verifier_dir(progress=False)
    (out / MARKER).write_text("{not json")
    convert.default_verifier_dir(progress=False)
    assert cache["convert"] == 2
    marker = json.loads((out / MARKER).read_text())
    marker["converter_version"] = -1
    (out / MARKER).write_text(json.dumps(marker))
    convert.default_verifier_dir(progress=False)
    assert cache["convert"] == 3
    with (out / "model.safetensors").open("r+b") as f:  # truncated behind our back
        f.truncate(100)
    convert.default_verifier_dir(progress=False)
    assert cache["convert"] == 4
    (out / MARKER).unlink()  # no marker at all, e.g. a dir someone made by hand
    convert.default_verifier_dir(progress=False)
    assert cache["convert"] == 5
    assert is_cache_hit(out, "float32", convert.default_gguf_sha256())


def test_interrupted_write_leaves_nothing(cache: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_lm import load

    def interrupted_save(path: Path, weights: dict) -> None:
        path.write_bytes(b"\0" * 1000)  # half a file, then Ctrl-C
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(convert, "_save_weights", interrupted_save)
        with pytest.raises(KeyboardInterrupt):
            convert.default_verifier_dir(progress=False)
    assert list(cache["root"].iterdir()) == []  # no out dir, no partial dir
    out = convert.default_verifier_dir(progress=False)
    assert cache["convert"] == 2
    load(str(out))


def test_killed_writer_leftovers_are_swept(cache: dict) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = cache["root"] / f".gemma3-270m-float32.partial-{dead.pid}-abc"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    live = cache["root"] / f".gemma3-270m-float32.partial-{1}-abc"  # pid 1 is always alive
    live.mkdir()
    convert.default_verifier_dir(progress=False)
    assert not leftover.exists()
    assert live.exists()


def test_replaces_only_its_own_dirs(tiny, converted: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    convert.convert_gguf(tiny[0], mine, progress=False)
    (mine / "stray.txt").write_text("from the old conversion")
    convert.convert_gguf(tiny[0], mine, progress=False)
    assert not (mine / "stray.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to replace"):
        convert.convert_gguf(tiny[0], users, progress=False)
    assert (users / "notes.txt").read_text() == "keep me"


def test_bad_gguf(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        convert.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(UserError, match="cannot read"):
        convert.convert_gguf(junk, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    other = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(other, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="only Gemma 3"):
        convert.convert_gguf(other, tmp_path / "out", progress=False)


def test_cli_missing_gguf_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_engine.convert_gguf", "--gguf", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: GGUF file not found: {tmp_path}/nope.gguf"]


def test_cli_convert_then_hit(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli-out"
    assert main(["--gguf", str(tiny[0]), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert captured.err == ""  # --quiet: no progress
    mtime = (out / MARKER).stat().st_mtime_ns
    assert main(["--gguf", str(tiny[0]), "--out", str(out), "--quiet"]) == 0
    assert (out / MARKER).stat().st_mtime_ns == mtime
    assert main(["--gguf", str(tiny[0]), "--out", str(out), "--quiet", "--force"]) == 0
    assert (out / MARKER).stat().st_mtime_ns != mtime
    assert main(["--gguf", str(tiny[0]), "--out", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: refusing to replace")


@pytest.mark.slow
def test_real_gemma3_270m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_lm import generate, load

    monkeypatch.setenv("KAKEYA_CACHE_DIR", str(tmp_path))
    convert.default_gguf_path()  # assemble outside the timing
    start = time.perf_counter()
    out = convert.default_verifier_dir(progress=False)
    seconds = time.perf_counter() - start
    print(f"real conversion: {seconds:.1f} s")
    assert out == tmp_path / "gemma3-270m-float32"
    start = time.perf_counter()
    assert convert.default_verifier_dir(progress=False) == out
    assert time.perf_counter() - start < 1.0  # a hit hashes nothing

    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["sliding_window"]) == (18, 512)
    assert config["eos_token_id"] == [1, 106]
    full = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    assert full == [5, 11, 17]

    model, tokenizer = load(str(out))
    text = 'def add(a, b):\n    """Sum."""\n    return a + b  # ünïcode\n'
    ids = tokenizer.encode(text)
    assert ids[0] == 2
    assert tokenizer.decode(ids[1:]) == text
    prompt = "def is_prime(n: int) -> bool:"
    completion = generate(model, tokenizer, prompt, max_tokens=16, verbose=False)
    print(repr(completion))
    lines = completion.splitlines()
    assert lines[0] == ""  # the signature line ends, and an indented body follows
    assert lines[1].startswith("    ")
    assert "prime" in completion or any(w in completion.split() for w in ("if", "return"))
    # 16 tokens stop mid-body; one of these endings must make it a valid function.
    endings = ["", "\n", '"""\n', "\n        pass\n", "pass\n"]
    assert any(_parses(prompt + completion + end) for end in endings), completion


@pytest.mark.slow
def test_real_gemma3_270m_keeps_its_quantization(tmp_path: Path) -> None:
    """Every Q4_K / Q5_0 / Q8_0 tensor of the PyPI file stays quantized (only Q6_K goes dense),
    and the model computes what the float32 conversion of the same file computes."""
    from mlx_lm import load

    gguf_path = convert.default_gguf_path()
    kept = convert.convert_gguf(gguf_path, tmp_path / "q", progress=False, keep_quantization=True)
    reader = open_gguf(gguf_path)
    want = {hf_name(t.name).removesuffix(".weight"): t.tensor_type.name
            for t in reader.tensors if t.tensor_type.name in ("Q4_K", "Q5_0", "Q8_0")}
    config = json.loads((kept / "config.json").read_text())
    layers = {k: v["bits"] for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert layers == {k: {"Q4_K": 4, "Q5_0": 5, "Q8_0": 8}[v] for k, v in want.items()}
    assert sum(t.tensor_type.name == "Q6_K" for t in reader.tensors) == 9  # dense: groups of 16
    ids = mx.array([[2, 1293, 563, 236779, 1551, 236769]])
    quantized, _ = load(str(kept))
    dense, _ = load(str(convert.default_verifier_dir(progress=False)))
    a, b = np.array(quantized(ids)), np.array(dense(ids))
    np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max())
    assert (a.argmax(-1) == b.argmax(-1)).all()


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def test_old_transformers_is_one_clear_error(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers <= 5.17 lacks the builder (its older one makes a tokenizer mlx-lm cannot
    detokenize): refuse in one line instead of converting wrongly."""
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf.gguf_tokenizer_mapping", None)
    with pytest.raises(UserError, match=r"needs transformers >= 5\.18"):
        convert.convert_gguf(tiny[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bulk_reader_builds_the_fields_gguf_builds(tiny) -> None:
    """Every metadata field, part for part (dtype and bytes), as llama.cpp's reader has it."""
    from mlx_engine.gguf.bulk_reader import BulkGGUFReader

    stock, bulk = gguf.GGUFReader(tiny[0]), BulkGGUFReader(tiny[0])
    assert list(stock.fields) == list(bulk.fields)
    arrays = 0
    for name, a in stock.fields.items():
        b = bulk.fields[name]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), name
        assert [(p.dtype, p.tobytes()) for p in a.parts] == [(p.dtype, p.tobytes())
                                                              for p in b.parts], name
        assert a.contents() == b.contents(), name
        arrays += a.types[0] == gguf.GGUFValueType.ARRAY
    assert arrays >= 3  # tokens, scores and token types at least took the bulk path
    assert [(t.name, t.data_offset) for t in stock.tensors] == [(t.name, t.data_offset)
                                                                for t in bulk.tensors]
