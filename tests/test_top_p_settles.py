"""scripts/top_p_settles.py on a tiny random target: it gathers the rows of sampled answers
and reports, per setting, the rows top-p's fast route was unsure of and any it got wrong."""

from __future__ import annotations

import json

from tiny import load_script, save_model_dir


def test_the_script_counts_every_row_and_finds_none_wrong(tmp_path):
    script = load_script("top_p_settles.py")
    model = save_model_dir(tmp_path / "model")
    out = tmp_path / "settles.json"
    argv = ["--model", str(model), "--workloads", "chat", "--n", "2", "--max-tokens", "5",
            "--temps", "1.0", "--top-ps", "0.5", "0.9", "--draws", "2", "--json", str(out)]
    assert script.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["temp"], r["top_p"]) for r in results] == [(1.0, 0.5), (1.0, 0.9)]
    assert all(r["rows"] == 2 * 2 * 5 and r["sure_but_differs"] == 0 for r in results)
