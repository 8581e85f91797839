"""The side-by-side bench: plumbing on a tiny random pair, adaptive width, BLAS, workloads."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TARGET_CONFIGS, drafter_config, prompt_tokens, save_model_dir, save_random_drafter

from mlx_engine import blas, evidence, workloads
from mlx_engine.adaptive import AdaptiveWidth, WidthCycle, calibrate
from mlx_engine.bench import main
from mlx_engine.engine import Engine, RunOptions
from mlx_engine.training.data import is_held_out

BLOCK = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    model = save_model_dir(root / "model")
    layers = TARGET_CONFIGS["gemma3_text"]["num_hidden_layers"]
    draft = save_random_drafter(root / "draft", drafter_config(layers, block_size=BLOCK))
    return model, draft


def _bench(pair, tmp_path, *extra: str) -> dict:
    model, draft = pair
    out = tmp_path / "evidence.json"
    rc = main(["--model", str(model), "--draft", str(draft), "--max-tokens", "12",
               "--n", "2", "--json", str(out), *extra])
    assert rc == 0
    record = json.loads(out.read_text())
    evidence.validate(record)
    return record


@pytest.mark.parametrize("workload", workloads.NAMES)
def test_bench_runs_every_workload(pair, tmp_path, workload):
    png = tmp_path / "bench.png"
    record = _bench(pair, tmp_path, "--workload", workload, "--plot", str(png))
    assert record["workload"] == workload and len(record["samples"]) == 2
    assert record["aggregate"]["lossless_all"] is True
    assert record["device"]["blas"]
    for s in record["samples"]:
        assert s["lossless"] is True and s["first_divergence"] is None
        assert set(s["fused"]["profile"]["time_split_s"]) == {"draft", "verify", "extend"}
        assert s["fused"]["profile"]["time_split_s"]["extend"] is not None
        assert s["fused"]["syncs_per_block"] == 2
        assert isinstance(s["mlx_lm"]["matches_ar"], bool)
        assert s["mlx_lm"]["new_tokens"] >= 1 and s["ar"]["e2e_tok_s"] > 0
        assert (s.get("retrieval") is not None) == (workload == "niah")
        if workload == "overgen":
            assert s["new_tokens"] == s["mlx_lm"]["new_tokens"] == 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_evidence_names_the_code_as_it_was_when_the_run_started(pair, tmp_path, monkeypatch):
    """A package edit made while a long bench runs must not relabel the code that ran."""
    edited = []
    monkeypatch.setattr(evidence, "git_sha", lambda: "abc-dirty" if edited else "abc")
    monkeypatch.setattr(evidence, "source_sha256", lambda: "e" * 64 if edited else "0" * 64)
    build_record = evidence.build_record

    def edit_then_build(*args, **kwargs):
        edited.append(True)
        return build_record(*args, **kwargs)

    monkeypatch.setattr(evidence, "build_record", edit_then_build)
    evidence.code_version.cache_clear()
    try:
        record = _bench(pair, tmp_path, "--workload", "code")
    finally:
        evidence.code_version.cache_clear()
    assert edited and record["tool"]["git_sha"] == "abc"
    assert record["tool"]["source_sha256"] == "0" * 64


def test_first_divergence_locates_the_first_differing_token():
    assert evidence.first_divergence([5, 6, 7], [5, 6, 7]) is None
    assert evidence.first_divergence([5, 6, 7], [5, 9, 7]) == 1
    assert evidence.first_divergence([5, 6, 7], [5, 6]) == 2  # one stream stopped early


@pytest.mark.parametrize("name", ["MLX_ENABLE_TF32", "MLX_CUDA_USE_CUDNN_SDPA"])
def test_engine_defaults_mlx_settings_unless_told(monkeypatch, name):
    import importlib

    import mlx_engine

    monkeypatch.delenv(name, raising=False)
    importlib.reload(mlx_engine)
    assert os.environ[name] == "0"
    monkeypatch.setenv(name, "1")
    importlib.reload(mlx_engine)
    assert os.environ[name] == "1"


def test_auto_block_size_is_lossless(pair, tmp_path):
    record = _bench(pair, tmp_path, "--workload", "code", "--block-size", "auto",
                    "--ignore-eos", "--no-mlx-lm", "--no-profile")
    assert record["aggregate"]["lossless_all"] is True
    assert set(record["params"]["auto_block_cost_s"]) == {str(w) for w in range(2, BLOCK + 1)}
    for s in record["samples"]:
        assert s["mlx_lm"] is None and "profile" not in s["fused"]
        assert sum(s["fused"]["width_hist"]) == s["fused"]["blocks"]


def test_any_width_sequence_equals_ar(pair):
    """The per-block width hook: random widths 2..B, past the sliding window, stay exact."""
    engine = Engine.load(str(pair[0]), str(pair[1]))
    prompt = prompt_tokens(40, seed=3)
    rng = random.Random(0)
    widths: list[int] = []

    def policy(stats) -> int:
        widths.append(rng.randint(2, BLOCK))
        return widths[-1]

    opts = RunOptions(max_tokens=48, ignore_eos=True)
    ar = engine.run("ar", prompt, opts).tokens
    assert engine.run("fused", prompt, RunOptions(48, ignore_eos=True, block_size=policy)).tokens \
        == ar
    assert len(set(widths)) > 3
    cost = calibrate(engine, prompt, BLOCK)
    assert sorted(cost) == list(range(2, BLOCK + 1)) and all(c > 0 for c in cost.values())


def test_adaptive_width_follows_cost_and_acceptance():
    linear = {w: float(w) for w in range(2, 17)}
    low = AdaptiveWidth(linear)
    for _ in range(20):
        low.observe(16, 0)
    assert low.best() == 2
    flat = AdaptiveWidth({w: 1.0 for w in range(2, 17)})
    for _ in range(20):
        flat.observe(16, 15)
    assert flat.best() == 16
    # a fixed cost per block plus a little per row (CPU + OpenBLAS); 3 drafts accepted per
    # block: verifying the 4th draft's row is still worth it, later ones are not
    mid = AdaptiveWidth({w: 1 + 0.1 * w for w in range(2, 17)})
    for _ in range(50):
        mid.observe(16, 3)
    assert mid.best() == 4


def test_calibrated_cost_caps_load_spikes():
    cycle = WidthCycle([2, 3, 4], repeats=2)
    cycle.times = {2: [1.0, 1.2], 3: [5.0, 6.0], 4: [2.0, 2.5]}  # width 3 hit by other load
    assert cycle.done and cycle.cost() == {2: 1.0, 3: 2.0, 4: 2.0}


def test_blas_detection_is_sensible(monkeypatch):
    info = blas.detect()
    assert info.kind in {"openblas", "mkl", "blis", "accelerate", "reference", "unknown", "gpu"}
    if info.kind != "gpu":
        assert info.gflops > 0 and "GFLOP/s" in info.describe()
    assert (blas.warning(info) is not None) == (info.kind == "reference")
    reference = blas.BlasInfo("reference", 2.5, None)
    assert "LD_PRELOAD=" in blas.warning(reference) or "apt-get" in blas.warning(reference)
    monkeypatch.setenv("LD_PRELOAD", "/opt/x/libopenblas.so.0")
    assert blas._preloaded_blas() == "/opt/x/libopenblas.so.0"


def test_code_workload_is_held_out_real_code():
    prompts = workloads.load("code")
    assert len(prompts) >= 20 and len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        assert is_held_out(p.source.split(":")[0]), p.source
        assert 200 <= len(p.text) <= 1500 and not p.ignore_eos and p.needle is None


def test_natural_and_overgen_workloads():
    natural, overgen = workloads.load("natural"), workloads.load("overgen")
    assert natural and [p.text for p in natural] == [p.text for p in overgen]
    assert all(is_held_out(p.source.split(":")[0]) for p in natural)
    assert not any(p.ignore_eos for p in natural) and all(p.ignore_eos for p in overgen)


def test_niah_workload_has_one_needle_and_a_question():
    for p in workloads.load("niah"):
        assert p.text.count(f'SECRET_KEY = "{p.needle}"') == 1
        assert p.text.count(p.needle) == 1 and p.text.endswith('SECRET_KEY == "')
        assert all(is_held_out(src) for src in p.source.split(","))


@pytest.mark.slow
def test_niah_contexts_exceed_1k_real_tokens():
    from tokenizers import Tokenizer

    from mlx_engine.convert_gguf import default_verifier_dir

    tok = Tokenizer.from_file(str(default_verifier_dir() / "tokenizer.json"))
    assert all(len(tok.encode(p.text).ids) >= 1000 for p in workloads.load("niah"))


@pytest.mark.parametrize("args, message", [
    (["--workload", "bogus"], "--workload must be one of"),
    (["--workload", "code", "--block-size", "big"], "--block-size must be an integer"),
    (["--workload", "code", "--block-size", "99"], "--block-size must be between 2"),
    (["--workload", "code", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--workload", "code", "--n", "0"], "--n must be >= 1"),
    (["--workload", "missing.jsonl"], "cannot read workload"),
])
def test_bad_input_is_one_line_and_exit_2(pair, capsys, args, message):
    rc = main(["--model", str(pair[0]), "--draft", str(pair[1]), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_bad_workload_record_and_missing_drafter(pair, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "no text field"}\n')
    assert main(["--model", str(pair[0]), "--draft", str(pair[1]), "--workload", str(bad)]) == 2
    assert "not a workload record" in capsys.readouterr().err
    assert main(["--model", str(pair[0]), "--draft", str(tmp_path / "nope"),
                 "--workload", "code"]) == 2
    assert "drafter" in capsys.readouterr().err


def test_openblas_flag_reexecs_or_explains():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run([sys.executable, "-m", "mlx_engine.bench", "--openblas",
                           "--workload", "bogus"], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
