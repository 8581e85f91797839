"""Loading paths users hit on a Mac: quantized targets, sharded drafters, Hugging Face ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from tiny import drafter_config, make_target, prompt_tokens, save_model_dir, save_random_drafter

from mlx_engine.drafter import DRAFT_VOCAB_FILE, load_drafter
from mlx_engine.engine import Engine, RunOptions
from mlx_engine.errors import UserError
from mlx_engine.policy import FixedWidth
from mlx_engine.proposer import DFlashDraftSource
from mlx_engine.sampling import GREEDY
from mlx_engine.sources import resolve_drafter, resolve_model
from mlx_engine.speculative import ar_stream, collect, fused_stream
from mlx_engine.verifier import Verifier


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_quantized_target_is_lossless(family, tmp_path):
    model = make_target(family)
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    verifier = Verifier(model)
    verifier.check_adapter()
    save_random_drafter(tmp_path, drafter_config(verifier.num_layers, block_size=8))
    drafter = load_drafter(tmp_path)
    verifier.set_taps(drafter.config.target_layer_ids)
    prompt = prompt_tokens(48, seed=21)
    ar = collect(ar_stream(verifier, prompt, 64))
    fused = collect(fused_stream(verifier, DFlashDraftSource(drafter, verifier), prompt, 64,
                                 FixedWidth(8)))
    assert fused == ar


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_a_multimodal_checkpoint_is_verified_through_its_text_model(family, tmp_path):
    """mlx-community's Gemma checkpoints load as a wrapper holding the LM as `language_model`
    (the README's Gemma 4 26B A4B among them): the engine drives that, losslessly."""
    model = save_model_dir(tmp_path / "model", family)
    draft = save_random_drafter(tmp_path / "draft", drafter_config(6, block_size=8))
    engine = Engine.load(str(model), str(draft))
    assert engine.verifier.text is engine.verifier.model.language_model
    prompt, opts = prompt_tokens(48, seed=4), RunOptions(max_tokens=40, ignore_eos=True)
    assert engine.run("fused", prompt, opts).tokens == engine.run("ar", prompt, opts).tokens


def test_sharded_drafter_loads_like_a_single_file(tmp_path):
    single = save_random_drafter(tmp_path / "single", drafter_config(6), seed=9)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(single / "config.json", sharded)
    weights = mx.load(str(single / "model.safetensors"))
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    index = {"weight_map": {}}
    for file, keys in halves.items():
        mx.save_safetensors(str(sharded / file), {k: weights[k] for k in keys})
        index["weight_map"].update(dict.fromkeys(keys, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    a = dict(tree_flatten(load_drafter(single).parameters()))
    b = dict(tree_flatten(load_drafter(sharded).parameters()))
    assert a.keys() == b.keys() == weights.keys()
    assert all(mx.array_equal(a[k], b[k]) for k in a)


def _fake_hub_cache(hub: Path, repo_id: str, source: Path) -> None:
    """Lay `source` out as huggingface_hub's cache would after a download."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_ids_resolve_through_huggingface_hub_offline(tmp_path, monkeypatch):
    model_src = save_model_dir(tmp_path / "src-model")
    draft_src = save_random_drafter(tmp_path / "src-draft", drafter_config(6, block_size=4))
    hub = tmp_path / "hub"
    _fake_hub_cache(hub, "tiny-org/tiny-model", model_src)
    _fake_hub_cache(hub, "tiny-org/tiny-DFlash", draft_src)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert (resolve_model("tiny-org/tiny-model", "float32") / "config.json").is_file()
    assert (resolve_drafter("tiny-org/tiny-DFlash") / "model.safetensors").is_file()
    engine = Engine.load("tiny-org/tiny-model", "tiny-org/tiny-DFlash")
    assert engine.drafter.config.block_size == 4
    with pytest.raises(UserError, match="cannot fetch model 'tiny-org/absent'"):
        resolve_model("tiny-org/absent", "float32")


def test_draft_vocabulary_restricts_drafts_and_stays_lossless(tmp_path, capsys):
    model_dir = save_model_dir(tmp_path / "model")
    draft = save_random_drafter(tmp_path / "draft", drafter_config(6, block_size=8))
    subset = mx.arange(0, 97, 3, dtype=mx.int32)
    mx.save_safetensors(str(draft / DRAFT_VOCAB_FILE), {"token_ids": subset})
    engine = Engine.load(str(model_dir), str(draft))
    assert engine.draft_head.vocab_ids.tolist() == subset.tolist()
    source = DFlashDraftSource(engine.drafter, engine.verifier, engine.draft_head)
    prompt = prompt_tokens(40, seed=4)
    engine.verifier.prefill(mx.array([prompt]), engine.verifier.make_cache(), source.extend)
    drafts = source.propose(mx.array([5]), 8, GREEDY, len(prompt) + 1)
    assert all(t % 3 == 0 for t in drafts.tolist())
    opts = RunOptions(max_tokens=48, ignore_eos=True)
    assert engine.run("fused", prompt, opts).tokens == engine.run("ar", prompt, opts).tokens
    mx.save_safetensors(str(draft / DRAFT_VOCAB_FILE), {"token_ids": mx.array([1, 500])})
    with pytest.raises(UserError, match="token ids in \\[0, 97\\)"):
        Engine.load(str(model_dir), str(draft))


def test_draft_vocab_command_writes_a_loadable_vocabulary(tmp_path):
    from mlx_engine import draft_vocab

    model_dir = save_model_dir(tmp_path / "model")
    draft = save_random_drafter(tmp_path / "draft", drafter_config(6, block_size=4))
    assert draft_vocab.main(["--draft", str(draft), "--model", str(model_dir), "--size", "8",
                             "--max-files", "20"]) == 0
    ids = mx.load(str(draft / DRAFT_VOCAB_FILE))["token_ids"].tolist()
    assert ids == sorted(set(ids)) and 0 < len(ids) <= 8 and max(ids) < 97
    engine = Engine.load(str(model_dir), str(draft))
    assert engine.draft_head.vocab_ids.tolist() == ids


def test_draft_vocab_counts_the_verifiers_answers_of_a_token_cache(tmp_path):
    from mlx_engine import draft_vocab
    from mlx_engine.training.data import TokenCache

    model_dir = save_model_dir(tmp_path / "model")
    draft = save_random_drafter(tmp_path / "draft", drafter_config(6, block_size=4))
    cache = tmp_path / "data.npz"  # a training answer of token 90 a thousand times, held out 91
    TokenCache([[2], [2]], [False, True], {}, [[90] * 1000, [91] * 1000]).save(cache)
    assert draft_vocab.main(["--draft", str(draft), "--model", str(model_dir), "--size", "8",
                             "--max-files", "20", "--cache", str(cache)]) == 0
    ids = mx.load(str(draft / DRAFT_VOCAB_FILE))["token_ids"].tolist()
    assert 90 in ids and 91 not in ids
