"""The offline Gemma 3 270M verifier: fused == AR past its 512-token sliding window."""

from __future__ import annotations

import inspect
import json
import json.decoder

import pytest
from tiny import save_random_drafter

from mlx_engine import evidence
from mlx_engine.drafter_config import build_target_layer_ids
from mlx_engine.generate import main

pytestmark = pytest.mark.slow

GEMMA3_270M = {"hidden": 640, "layers": 18, "vocab": 262144}


@pytest.fixture(scope="module")
def random_drafter(tmp_path_factory):
    """A random 1-layer drafter shaped for Gemma 3 270M (acceptance is near zero: every
    block exercises the rollback path)."""
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "hidden_size": GEMMA3_270M["hidden"], "intermediate_size": 256, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
        "vocab_size": GEMMA3_270M["vocab"], "layer_types": ["full_attention"],
        "block_size": 16, "num_target_layers": GEMMA3_270M["layers"],
        "dflash_config": {"mask_token_id": 6, "block_size": 16,
                          "target_layer_ids": build_target_layer_ids(18, 3)},
    }
    return save_random_drafter(tmp_path_factory.mktemp("draft270m"), config)


@pytest.mark.parametrize("block_size", [4, 16])
def test_fused_equals_ar_on_a_long_code_prompt(random_drafter, tmp_path, block_size):
    prompt = tmp_path / "prompt.py"
    prompt.write_text(inspect.getsource(json.decoder)[:2600])
    out = tmp_path / "evidence.json"
    rc = main(["--draft", str(random_drafter), "--prompt-file", str(prompt), "--mode", "both",
               "--max-tokens", "64", "--ignore-eos", "--block-size", str(block_size),
               "--no-warmup", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    evidence.validate(record)
    sample = record["samples"][0]
    assert sample["prompt_tokens"] > 512  # past the sliding window of 15 of its 18 layers
    assert sample["new_tokens"] == 64
    assert sample["lossless"] is True and record["aggregate"]["lossless_all"] is True
    assert record["verifier"]["dtype"] == "float32"
    assert sample["fused"]["syncs_per_block"] == 2
