"""The side-by-side bench: plumbing on a tiny random pair, adaptive width, BLAS, workloads."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
from tiny import TARGET_CONFIGS, drafter_config, prompt_tokens, save_model_dir, save_random_drafter

from mlx_engine import evidence, workloads
from mlx_engine.bench import main
from mlx_engine.engine import Engine, RunOptions
from mlx_engine.policy import Acceptance, FixedWidth
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
        # two-phase: 2 syncs per drafted block (a random drafter may soon draft only shadows)
        assert s["fused"]["syncs_per_block"] == (2 if s["fused"]["blocks"] else 0)
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


def test_default_adaptive_and_fixed_widths_are_lossless(pair, tmp_path):
    record = _bench(pair, tmp_path, "--workload", "code", "--ignore-eos", "--no-mlx-lm",
                    "--no-profile")
    assert record["aggregate"]["lossless_all"] is True
    assert set(record["params"]["round_cost_s"]) == {"1", "2", "4", "8"}
    for s in record["samples"]:
        assert s["mlx_lm"] is None and "profile" not in s["fused"]
        assert sum(s["fused"]["width_hist"]) == s["fused"]["blocks"]
        assert s["fused"]["ar_steps"] >= 0
    fixed = _bench(pair, tmp_path, "--workload", "code", "--block-size", "4", "--repeats", "3")
    assert fixed["aggregate"]["lossless_all"] is True and "round_cost_s" not in fixed["params"]
    assert fixed["params"]["repeats"] == 3 and all(s["mlx_lm"]["matches_ar"]
                                                   for s in fixed["samples"])
    for s in fixed["samples"]:
        assert s["fused"]["ar_steps"] == 0 and s["fused"]["width_hist"][4] == s["fused"]["blocks"]
        assert len(s["ar"]["repeat_decode_tok_s"]) == 3
        assert s["ar"]["decode_tok_s"] == sorted(s["ar"]["repeat_decode_tok_s"])[1]
    floor = fixed["aggregate"]
    assert floor["timed_prompts"] == len(fixed["samples"])
    assert 0 <= floor["ar_vs_ar_below_0_95"] <= floor["timed_prompts"]
    assert 0 < floor["ar_vs_ar_min_median"] <= 1
    fastest = [max(s["fused"]["repeat_decode_tok_s"]) / max(s["ar"]["repeat_decode_tok_s"])
               for s in fixed["samples"]]
    assert floor["fastest_fused_vs_ar_below_0_95"] == sum(r < 0.95 for r in fastest)
    assert "ar_vs_ar_min_median" not in record["aggregate"]  # one repeat: no noise floor


def test_a_sampled_bench_is_lossless_against_ar_with_each_prompts_seed(pair, tmp_path):
    record = _bench(pair, tmp_path, "--workload", "chat", "--ignore-eos", "--no-mlx-lm",
                    "--no-profile", "--temp", "0.9", "--top-k", "20", "--seed", "4")
    greedy = _bench(pair, tmp_path, "--workload", "chat", "--ignore-eos", "--no-mlx-lm",
                    "--no-profile")
    assert record["aggregate"]["lossless_all"] is True and record["params"]["temp"] == 0.9
    assert set(record["params"]["round_cost_s"]) == {"1", "2", "4", "8"}
    assert [s["output_sha256"] for s in record["samples"]] != [
        s["output_sha256"] for s in greedy["samples"]]


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_starts_every_prompt_with_a_new_engines_acceptance(pair, tmp_path, monkeypatch,
                                                                  fresh):
    """`--fresh` measures what each `generate` run gets: no acceptance carried from the
    prompts before; without it, a prompt starts from what earlier ones taught the engine."""
    starts = []
    run = Engine.run

    def spy(self, mode, prompt, opts, on_text=None):
        if mode == "fused":
            starts.append(list(self.acceptance["greedy"].tried))
        return run(self, mode, prompt, opts, on_text)

    monkeypatch.setattr(Engine, "run", spy)
    _bench(pair, tmp_path, "--workload", "code", "--ignore-eos", "--no-mlx-lm", "--no-profile",
           "--repeats", "2", *(["--fresh"] if fresh else []))
    new = Acceptance(BLOCK).tried
    assert len(starts) == 4 and starts[0] == new and starts[1] == new  # repeats re-start
    assert (starts[2] == new) == fresh and starts[2] == starts[3]


class RandomWidths(FixedWidth):
    """Any width 1..B in any order (1: an AR step inside the fused loop)."""

    def __init__(self, max_width: int, seed: int = 0):
        super().__init__(max_width)
        self.rng, self.widths = random.Random(seed), []

    def next_width(self) -> int:
        self.widths.append(self.rng.randint(1, self.max_width))
        return self.widths[-1]


def test_any_width_sequence_equals_ar(pair):
    """The per-round width hook: random widths 1..B, past the sliding window, stay exact."""
    engine = Engine.load(str(pair[0]), str(pair[1]))
    prompt = prompt_tokens(40, seed=3)
    policy = RandomWidths(BLOCK)
    ar = engine.run("ar", prompt, RunOptions(max_tokens=48, ignore_eos=True)).tokens
    fused = engine.run("fused", prompt, RunOptions(48, ignore_eos=True, block_size=policy))
    assert fused.tokens == ar
    assert len(set(policy.widths)) > 3 and fused.stats.ar_steps > 0
    costs = engine.calibrate()
    assert costs.widths == [1, 2, 4, 8] and all(c > 0 for c in costs.measured.values())


def test_calibration_pools_passes_until_its_minimum_time(pair, monkeypatch):
    """One pass's medians are noisy where a pass is short (a GPU's): passes are pooled until
    CALIBRATION_SECONDS have gone by, and the costs are the medians of all their rounds."""
    import time

    from mlx_engine import engine as engine_module
    from mlx_engine.policy import RoundCosts

    engine = Engine.load(str(pair[0]), str(pair[1]))
    passes: list[list[tuple[int, float]]] = []
    one_pass = engine._calibration_pass

    def counted(graph, sampling):
        passes.append(one_pass(graph, sampling))
        return passes[-1]

    monkeypatch.setattr(engine, "_calibration_pass", counted)
    start = time.perf_counter()
    engine.calibrate()  # the floor at 0: one pass
    assert len(passes) == 1
    floor = 2.5 * (time.perf_counter() - start)
    monkeypatch.setattr(engine_module, "CALIBRATION_SECONDS", floor)
    passes.clear()
    start = time.perf_counter()
    costs = engine.calibrate()
    assert time.perf_counter() - start >= floor and len(passes) >= 2
    pooled = RoundCosts.from_rounds([r for rounds in passes for r in rounds])
    assert costs.measured == pooled.measured and engine.costs(RunOptions()) is costs


def test_stop_strings_end_every_arm_at_the_same_token(pair):
    """A stop string spanning tokens ends AR, fused and mlx-lm at the token completing it."""
    from mlx_engine.bench import mlx_lm_run

    engine = Engine.load(str(pair[0]), str(pair[1]))
    prompt = prompt_tokens(40, seed=9)
    free = engine.run("ar", prompt, RunOptions(max_tokens=40, ignore_eos=True)).tokens
    stop = engine.tokenizer.decode(free[20:22])  # two words: it spans a token boundary
    first = next(n for n in range(1, 41) if stop in engine.tokenizer.decode(free[:n]))
    opts = RunOptions(max_tokens=40, ignore_eos=True, stop=(stop,))
    runs = [engine.run("ar", prompt, opts), engine.run("fused", prompt, opts),
            engine.run("fused", prompt, replace(opts, block_size=2)),
            mlx_lm_run(engine, prompt, opts)[0]]
    for run in runs:
        assert run.tokens == free[:first] and run.stats.finish_reason == "stop"
        assert run.stats.new_tokens == first


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

    from mlx_engine.gguf.convert import default_verifier_dir

    tok = Tokenizer.from_file(str(default_verifier_dir() / "tokenizer.json"))
    assert all(len(tok.encode(p.text).ids) >= 1000 for p in workloads.load("niah"))


@pytest.mark.parametrize("args, message", [
    (["--workload", "bogus"], "--workload must be one of"),
    (["--workload", "code", "--block-size", "big"], "--block-size must be an integer"),
    (["--workload", "code", "--block-size", "99"], "--block-size must be between 2"),
    (["--workload", "code", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--workload", "code", "--n", "0"], "--n must be >= 1"),
    (["--workload", "code", "--repeats", "0"], "--repeats must be >= 1"),
    (["--workload", "missing.jsonl"], "cannot read workload"),
    (["--workload", "code", "--temp", "0.7"], "--temp compares our AR and fused arms only"),
    (["--workload", "code", "--temp", "-1"], "need --temp >= 0"),
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


def test_the_schema_tells_decoding_records_from_parity_records():
    """A decoding record without samples, or a parity record with a decoding aggregate, fails."""
    import jsonschema

    header = {"schema_version": 1, "created_at": "2026-01-01T00:00:00+00:00",
              "tool": {"name": "kakeya-mlx", "version": "0", "git_sha": None},
              "device": {"platform": "p", "machine": "m", "chip": "c", "mlx_version": "0",
                         "backend": "cpu"},
              "verifier": {"id": "v", "sha256": "0" * 64, "dtype": "float32"},
              "drafter": None, "params": {}}
    decoding = {"ar_decode_tok_s": 1.0, "fused_decode_tok_s": None, "speedup_vs_ar": None,
                "mean_accept_len": None, "lossless_all": None}
    evidence.validate({**header, "samples": [], "aggregate": decoding})
    with pytest.raises(jsonschema.ValidationError):
        evidence.validate({**header, "aggregate": decoding})
    with pytest.raises(jsonschema.ValidationError):
        evidence.validate({**header, "kind": "drafter-parity", "aggregate": decoding})


def test_sample_extensions_are_the_schemas_keys_and_a_misspelt_one_fails():
    """The TypedDicts name exactly the optional keys the schema knows for a sample and an arm."""
    from mlx_engine.engine import RunResult
    from mlx_engine.speculative import DecodeStats

    defs = json.loads(evidence.SCHEMA_PATH.read_text())["$defs"]
    sample_keys = set(defs["sample"]["properties"])
    assert set(evidence.SampleExtensions.__annotations__) <= sample_keys
    assert set(evidence.ArmExtensions.__annotations__) <= set(defs["timing_fused"]["properties"])
    assert "repeat_decode_tok_s" in defs["timing_ar"]["properties"]
    run = RunResult([1, 2], DecodeStats(prompt_tokens=3))
    record = evidence.sample_record("p", 3, None, run, None, {"source": "s"},
                                    ar_extra={"repeat_decode_tok_s": [1.0]})
    assert record["source"] == "s" and record["ar"]["repeat_decode_tok_s"] == [1.0]
    with pytest.raises(ValueError, match="not SampleExtensions keys: sorce"):
        evidence.sample_record("p", 3, None, run, None, {"sorce": "s"})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(ValueError, match="not ArmExtensions keys: profil"):
        evidence.sample_record("p", 3, None, run, None, ar_extra={"profil": {}})  # type: ignore[typeddict-unknown-key]
