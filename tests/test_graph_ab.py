"""The graph-mode A/B (scripts/gpu/graph_ab.py) on a tiny random pair: every mode's tokens
are checked against AR's, and the report has each mode's paired numbers and the anatomy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tiny import TARGET_CONFIGS, drafter_config, save_model_dir, save_random_drafter

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu" / "graph_ab.py"


def test_the_ab_reports_every_mode_against_ar(tmp_path):
    spec = importlib.util.spec_from_file_location("graph_ab", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = save_model_dir(tmp_path / "model")
    layers = TARGET_CONFIGS["gemma3_text"]["num_hidden_layers"]
    draft = save_random_drafter(tmp_path / "draft", drafter_config(layers, block_size=4))
    out = tmp_path / "ab.json"
    script.main(["--model", str(model), "--draft", str(draft), "--n", "3", "--tokens", "12",
                 "--width", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"two-phase", "single", "ar_step_ms"}
    assert len(report["prompts"]) == 3
    assert all(set(p) == {"ar", "two-phase", "single"} for p in report["prompts"])
    for part in ("verify_1", "verify_4", "draft"):
        timing = report["anatomy"][part]
        assert 0 < timing["build_ms"] <= timing["build_eval_ms"]
    assert report["tool"]["source_sha256"]
