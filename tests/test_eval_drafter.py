"""The per-kind engine evaluation: plumbing on a tiny random pair (fast, no real model)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import TARGET_CONFIGS, drafter_config, save_model_dir, save_random_drafter

from mlx_engine import eval_drafter
from mlx_engine.training.kinds import KINDS

BLOCK = 8


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    layers = TARGET_CONFIGS["gemma3_text"]["num_hidden_layers"]
    return (save_model_dir(root / "model"),
            save_random_drafter(root / "draft", drafter_config(layers, block_size=BLOCK)))


def _run(pair, out: Path, *extra: str) -> dict:
    model, draft = pair
    rc = eval_drafter.main(["--model", str(model), "--draft", str(draft), "--n", "2",
                            "--kinds", "function_body", "chat", "readme", "--blocks", "4", "8",
                            "--max-tokens", "10", "--max-prompt-tokens", "128",
                            "--json", str(out), "--markdown", str(out.with_suffix(".md")),
                            *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_every_kind_runs_lossless_at_every_block_and_lands_in_the_table(pair, tmp_path):
    result = _run(pair, tmp_path / "a.json")
    assert list(result["kinds"]) == ["function_body", "chat", "readme"]
    body = result["kinds"]["function_body"]
    assert body["stop"] == list(KINDS["function_body"].stop)
    assert [len(p["prompt"]) for p in body["prompts"]] == [
        p["prompt_tokens"] for p in body["prompts"]]
    assert all(p["prompt_tokens"] in (64, 128) for p in body["prompts"])
    assert len(result["kinds"]["readme"]["prompts"]) == 1
    for kind in result["kinds"].values():
        for b in ("4", "8"):
            s = kind["summary"][b]
            assert s["lossless"] == s["prompts"] == len(kind["prompts"])
            taus = [p["blocks"][b]["tau"] for p in kind["prompts"] if p["blocks"][b]["rounds"]]
            assert s["mean_tau"] == pytest.approx(sum(taus) / len(taus))
            assert all(1 <= t <= int(b) for t in taus)
    table = (tmp_path / "a.md").read_text().splitlines()
    assert table[0].startswith("| kind |") and "tau B=8" in table[0]
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| function_body", "| chat", "| readme"]


def test_a_baseline_lends_its_answers_and_stands_beside_the_new_taus(pair, tmp_path,
                                                                        monkeypatch):
    first = _run(pair, tmp_path / "before.json")
    calls = []
    real = eval_drafter.Engine.run

    def counting(self, mode, prompt, opts, on_tokens=None):
        calls.append(mode)
        return real(self, mode, prompt, opts, on_tokens)

    monkeypatch.setattr(eval_drafter.Engine, "run", counting)
    again = _run(pair, tmp_path / "after.json", "--baseline", str(tmp_path / "before.json"))
    assert "ar" not in calls  # every prompt's AR answer came from the baseline
    assert [p["answer"] for p in again["kinds"]["chat"]["prompts"]] == [
        p["answer"] for p in first["kinds"]["chat"]["prompts"]]
    row = (tmp_path / "after.md").read_text().splitlines()[2]
    assert row.count("->") == 2


def test_a_kinds_prompts_do_not_depend_on_the_kinds_run_beside_it():
    class CharTokenizer:
        bos_token_id = 1

        def encode(self, text: str, add_special_tokens: bool) -> list[int]:
            return [ord(c) for c in text]

    engine = SimpleNamespace(tokenizer=CharTokenizer())

    def prompts(*kinds: str) -> dict:
        args = eval_drafter.build_parser().parse_args(
            ["--json", "x.json", "--n", "2", "--max-prompt-tokens", "128", "--kinds", *kinds])
        return {name: p for name, (_, p) in eval_drafter.eval_prompts(engine, args).items()}

    together = prompts("function_body", "chat", "snippet")
    assert together["chat"] == prompts("chat")["chat"]
    assert together["snippet"] == prompts("snippet", "function_body")["snippet"]
    assert together["chat"] != together["snippet"]


def _result(kind: str, answers: list[list[int]], taus: list[float]) -> dict:
    return {"kinds": {kind: {"prompts": [
        {"answer": a, "blocks": {"16": {"tau": t, "rounds": 1 if t else 0}}}
        for a, t in zip(answers, taus, strict=True)]}}}


def test_compare_pairs_two_runs_prompt_by_prompt(tmp_path):
    answers = [[1, 2], [3], [4, 5], [6, 7], [8, 9]]
    before = tmp_path / "before.json"
    after = tmp_path / "after.json"
    before.write_text(json.dumps(_result("chat", answers, [2.0, 0.0, 3.0, 4.0, 5.0])))
    after.write_text(json.dumps(_result("chat", answers, [3.0, 0.0, 3.0, 3.0, 7.0])))
    table = tmp_path / "cmp.md"
    assert eval_drafter.main(["--compare", str(before), str(after),
                              "--markdown", str(table)]) == 0
    row = table.read_text().splitlines()[2].split(" | ")
    # the prompt that never drafted (a one-token answer) is left out; changes +1, 0, -1, +2
    assert row[:4] == ["| chat", "16", "4", "3.50 -> 4.00"]
    assert row[4].startswith("+0.50 +- ")
    assert row[5] == "2 / 1"
    assert eval_drafter.sign_test_p(2, 1) == 1.0
    assert eval_drafter.sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert eval_drafter.sign_test_p(0, 5) == pytest.approx(2 / 32)


def test_compare_refuses_runs_of_other_prompts(tmp_path, capsys):
    one, other = tmp_path / "one.json", tmp_path / "other.json"
    one.write_text(json.dumps(_result("chat", [[1], [2]], [2.0, 2.0])))
    other.write_text(json.dumps(_result("chat", [[1], [9]], [2.0, 2.0])))
    assert eval_drafter.main(["--compare", str(one), str(other)]) == 2
    assert "did not answer the same prompts" in capsys.readouterr().err
    other.write_text(json.dumps(_result("prose", [[1], [2]], [2.0, 2.0])))
    assert eval_drafter.main(["--compare", str(one), str(other)]) == 2
    assert "share no prompt kind" in capsys.readouterr().err
    other.write_text(json.dumps({"samples": []}))
    assert eval_drafter.main(["--compare", str(one), str(other)]) == 2
    assert "as an eval_drafter result" in capsys.readouterr().err
