"""The policy trace (scripts/policy_trace.py) on a tiny random pair."""

from __future__ import annotations

import json

from tiny import load_script, save_pair


def test_the_trace_logs_every_round_of_the_auto_run(tmp_path):
    script = load_script("policy_trace.py")
    model, draft = save_pair(tmp_path, 4)
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
