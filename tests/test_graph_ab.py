"""The graph-mode A/B (scripts/gpu/graph_ab.py) on a tiny random pair: every mode's tokens
are checked against AR's, and the report has each mode's paired numbers and the anatomy."""

from __future__ import annotations

import json

from tiny import load_script, save_pair


def test_the_ab_reports_every_mode_against_ar(tmp_path):
    script = load_script("gpu/graph_ab.py")
    model, draft = save_pair(tmp_path, 4)
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
