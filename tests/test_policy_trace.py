"""The policy trace (scripts/policy_trace.py) on a tiny random pair."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tiny import TARGET_CONFIGS, drafter_config, save_model_dir, save_random_drafter

SCRIPT = Path(__file__).parents[1] / "scripts" / "policy_trace.py"


def test_the_trace_logs_every_round_of_the_auto_run(tmp_path):
    spec = importlib.util.spec_from_file_location("policy_trace", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = save_model_dir(tmp_path / "model")
    layers = TARGET_CONFIGS["gemma3_text"]["num_hidden_layers"]
    draft = save_random_drafter(tmp_path / "draft", drafter_config(layers, block_size=4))
    out = tmp_path / "trace.json"
    script.main(["--model", str(model), "--draft", str(draft), "--workload", "overgen",
                 "--n", "2", "--max-tokens", "40", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["round_cost_s"]) == {"1", "2", "4"}
    for prompt in report["prompts"]:
        rounds = [e for e in prompt["log"] if e["event"] == "round"]
        assert len(rounds) == prompt["auto_blocks"] + prompt["auto_ar_steps"]
        shadows = [e for e in prompt["log"] if e["event"] == "shadow"]
        assert len(shadows) <= prompt["auto_shadows"]
        assert all(0 <= e["accepted"] <= e["checked"] for e in shadows)
