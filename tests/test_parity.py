"""The parity gate: MLX and torch drafters draft the same tokens from the same taps."""

from __future__ import annotations

import json

import pytest
from tiny import drafter_config, prompt_tokens, save_model_dir, save_random_drafter, words

from mlx_engine import evidence, parity

PROMPTS = [words(prompt_tokens(40, seed=s)) for s in range(2)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    model = save_model_dir(root / "model")
    draft = save_random_drafter(root / "draft", drafter_config(6, block_size=8))
    return model, draft


def _run(pair, tmp_path, dtype: str) -> tuple[int, dict]:
    model, draft = pair
    out = tmp_path / f"parity-{dtype}.json"
    rc = parity.main(["--model", str(model), "--draft", str(draft), "--dtype", dtype, "--n", "2",
                      "--new-tokens", "24", "--stride", "3", "--json", str(out)], prompts=PROMPTS)
    record = json.loads(out.read_text())
    evidence.validate(record)  # a parity record, schema-checked like every other
    assert record["kind"] == "drafter-parity" and "samples" not in record
    return rc, record["aggregate"]


def test_fp32_drafts_agree_exactly(pair, tmp_path):
    rc, result = _run(pair, tmp_path, "float32")
    assert rc == 0 and result["passed"] is True
    assert result["agreement"] == 1.0 and result["positions"] > 50


def test_bf16_agreement_is_reported(pair, tmp_path):
    rc, result = _run(pair, tmp_path, "bfloat16")
    assert rc == 0 and result["passed"] is None
    assert 0.5 < result["agreement"] <= 1.0


def test_a_port_bug_fails_the_gate(pair, tmp_path, monkeypatch):
    """Perturb one MLX weight (as a port bug would): fp32 agreement drops and exit is 1."""
    original = parity.MLXSide.__init__

    def broken(self, engine, matrices, dtype):
        original(self, engine, matrices, dtype)
        layer = engine.drafter.layers[0].mlp
        layer.down_proj.weight = layer.down_proj.weight * 3 + 0.05

    monkeypatch.setattr(parity.MLXSide, "__init__", broken)
    rc, result = _run(pair, tmp_path, "float32")
    assert rc == 1 and result["passed"] is False and result["agreement"] < 1.0
    assert result["max_abs_logit_diff"] > 0
