"""`python -m mlx_engine.generate`: evidence on a tiny local pair, one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import drafter_config, prompt_tokens, save_model_dir, save_random_drafter, words

from mlx_engine import evidence
from mlx_engine.generate import main

PROMPT = words(prompt_tokens(40))  # longer than the tiny targets' sliding window


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    model = save_model_dir(root / "model")
    draft = save_random_drafter(root / "draft", drafter_config(6, block_size=8))
    return model, draft


def _run_both(pair, tmp_path, *flags: str) -> dict:
    model, draft = pair
    out = tmp_path / "evidence.json"
    rc = main(["--model", str(model), "--draft", str(draft), "--prompt", PROMPT, "--mode", "both",
               "--max-tokens", "48", "--ignore-eos", "--profile", "--json", str(out), *flags])
    assert rc == 0
    record = json.loads(out.read_text())
    evidence.validate(record)
    sample = record["samples"][0]
    assert sample["new_tokens"] == 48 and sample["prompt_tokens"] == 40
    assert record["aggregate"]["lossless_all"] is True
    return record


def test_fixed_width_writes_valid_lossless_evidence(pair, tmp_path, capsys):
    record = _run_both(pair, tmp_path, "--block-size", "8")
    fused = record["samples"][0]["fused"]
    assert sum(fused["accept_hist"]) == fused["blocks"] > 0 and fused["ar_steps"] == 0
    assert fused["syncs_per_block"] == 3  # profiled: draft, accept, extend
    assert fused["time_split_s"]["extend"] is not None
    assert record["drafter"]["block_size"] == 8
    err = capsys.readouterr().err
    assert "speedup vs AR" in err and "lossless yes" in err


def test_adaptive_width_records_its_calibration(pair, tmp_path, capsys):
    """Whether the policy drafts on a random drafter depends on this machine's timings, so
    only what holds either way is asserted: every token came from a round or an AR step."""
    record = _run_both(pair, tmp_path)
    fused = record["samples"][0]["fused"]
    assert sum(fused["accept_hist"]) == fused["blocks"]
    emitted = sum((a + 1) * n for a, n in enumerate(fused["accept_hist"])) + fused["ar_steps"]
    # the prefill emits the first token; a last block may commit up to 7 drafts past the cap
    assert 48 - 1 <= emitted <= 48 - 1 + 7
    assert set(record["params"]["round_cost_s"]) == {"1", "2", "4", "8"}
    assert "charged to no arm" in record["params"]["timing"]
    assert "speedup vs AR" in capsys.readouterr().err


def test_sampling_without_a_seed_draws_one_and_says_which(pair, tmp_path, capsys):
    """Each sampled run without --seed is a fresh sample (both arms the same one: lossless),
    its seed printed and in the evidence; that seed draws the same tokens again."""
    runs = [_run_both(pair, tmp_path, "--block-size", "4", "--temp", "0.9") for _ in range(2)]
    seeds = [r["params"]["seed"] for r in runs]
    assert seeds[0] != seeds[1] and all(isinstance(s, int) for s in seeds)
    assert f"--seed {seeds[1]} draws this sample again" in capsys.readouterr().err
    again = _run_both(pair, tmp_path, "--block-size", "4", "--temp", "0.9", "--seed",
                      str(seeds[1]))
    assert again["params"]["seed"] == seeds[1]
    assert again["samples"][0]["output_sha256"] == runs[1]["samples"][0]["output_sha256"]
    assert runs[0]["samples"][0]["output_sha256"] != runs[1]["samples"][0]["output_sha256"]


def test_ar_mode_needs_no_drafter(pair, tmp_path):
    model, _ = pair
    out = tmp_path / "ar.json"
    assert main(["--model", str(model), "--draft", "/nonexistent", "--prompt", PROMPT,
                 "--mode", "ar", "--max-tokens", "8", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["drafter"] is None and record["samples"][0]["fused"] is None
    assert record["aggregate"]["lossless_all"] is None


def _mismatched_drafter(root: Path, **changes) -> Path:
    config = drafter_config(6, block_size=8)
    config.update(changes)
    return save_random_drafter(root, config)


def _corrupt_model(root: Path) -> Path:
    model = save_model_dir(root)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    return model


def _drafter_missing_tensor(root: Path) -> Path:
    import mlx.core as mx

    draft = save_random_drafter(root, drafter_config(6, block_size=8))
    weights = mx.load(str(draft / "model.safetensors"))
    weights.pop("fc.weight")
    mx.save_safetensors(str(draft / "model.safetensors"), weights)
    return draft


BAD_INPUTS = {
    "missing model dir": (lambda m, d, t: ["--model", str(t / "nope"), "--draft", str(d)],
                          "neither an existing dir"),
    "corrupt model dir": (lambda m, d, t: ["--model", str(_corrupt_model(t / "bad")),
                                           "--draft", str(d)], "cannot load model dir"),
    "drafter hidden size": (lambda m, d, t: ["--model", str(m), "--draft",
                                             str(_mismatched_drafter(t / "h", hidden_size=32))],
                            "hidden_size 32 != verifier hidden_size 64"),
    "drafter vocab": (lambda m, d, t: ["--model", str(m), "--draft",
                                       str(_mismatched_drafter(t / "v", vocab_size=50))],
                      "vocab_size 50 != verifier vocab_size 97"),
    "drafter missing tensor": (lambda m, d, t: ["--model", str(m), "--draft",
                                                str(_drafter_missing_tensor(t / "mt"))],
                               "missing tensors ['fc.weight']"),
    "drafter taps too deep": (lambda m, d, t: ["--model", str(m), "--draft", str(
        _mismatched_drafter(t / "tap", num_target_layers=None,
                            dflash_config={"mask_token_id": 96, "target_layer_ids": [1, 9]}))],
                              "target_layer_ids [9] are not < verifier layers 6"),
    "block size 1": (lambda m, d, t: ["--model", str(m), "--draft", str(d), "--block-size", "1"],
                     "--block-size must be between 2 and the drafter's 8"),
    "block size too big": (lambda m, d, t: ["--model", str(m), "--draft", str(d),
                                            "--block-size", "9"], "not 9"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, pair, tmp_path, capsys):
    model, draft = pair
    make_args, expected = BAD_INPUTS[case]
    rc = main([*make_args(model, draft, tmp_path), "--prompt", PROMPT, "--max-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


def test_empty_prompt_and_unreadable_file(pair, tmp_path, capsys):
    model, draft = pair
    assert main(["--model", str(model), "--draft", str(draft), "--prompt", "  "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["--model", str(model), "--draft", str(draft), "--prompt-file",
                 str(tmp_path / "missing.txt")]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_engine.generate", "--model", str(tmp_path / "absent"),
         "--prompt", "hi"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_git_sha_marks_a_dirty_package(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    package = tmp_path / "pkg"
    package.mkdir()
    assert evidence.git_sha(package) is None  # not a checkout
    git("init", "-q")
    (package / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    clean = evidence.git_sha(package)
    assert clean is not None and len(clean) == 40
    (package / "new.py").write_text("")  # untracked: not code that ran
    (tmp_path / "README.md").write_text("edited while a bench ran\n")  # outside the package
    assert evidence.git_sha(package) == clean
    (package / "a.py").write_text("x = 2\n")
    assert evidence.git_sha(package) == f"{clean}-dirty"


def test_source_sha256_follows_the_code_and_its_layout(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 1\n")
    first = evidence.source_sha256(package)
    (package / "notes.md").write_text("not code\n")
    assert evidence.source_sha256(package) == first
    (package / "sub" / "b.py").write_text("y = 2\n")
    assert evidence.source_sha256(package) != first
    (package / "sub" / "b.py").write_text("y = 1\n")
    (package / "sub" / "b.py").rename(package / "b.py")  # same bytes, other module
    assert evidence.source_sha256(package) != first
