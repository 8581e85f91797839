"""The torch reference drafter and target adapter: semantics, checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mlx_engine.drafter_config import (  # noqa: E402
    DrafterConfig,
    build_target_layer_ids,
    check_compatible,
)
from mlx_engine.errors import UserError  # noqa: E402
from mlx_engine.reference.torch_drafter import (  # noqa: E402
    RMSNorm,
    TorchDFlashDrafter,
    block_mask,
    config_dict,
)

H, V = 32, 61


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def config(**over) -> DrafterConfig:
    base = dict(
        hidden_size=H, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=V, block_size=6, mask_token_id=V - 1,
        target_layer_ids=[1, 3], num_target_layers=6, rope_theta=10_000.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=5,
    )
    base.update(over)
    return DrafterConfig(**base)


def random_drafter(seed: int = 0, **over) -> TorchDFlashDrafter:
    torch.manual_seed(seed)
    model = TorchDFlashDrafter(config(**over))
    with torch.no_grad():  # off-unit norms so a wrong norm formula shows up
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def embed_head(seed: int = 1):
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(seed))
    return (lambda ids: F.embedding(ids, w)), (lambda h: h @ w.T)


def test_build_target_layer_ids_follows_z_lab():
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B
    assert build_target_layer_ids(18, 4) == [1, 6, 10, 15]  # Gemma 3 270M, 4 taps
    assert build_target_layer_ids(18, 1) == [9]
    assert max(build_target_layer_ids(18, 5)) == 18 - 3


def test_rmsnorm_multiplies_by_w_not_one_plus_w():
    norm = RMSNorm(4, eps=0.0)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert torch.allclose(norm(x), 2 * x)


def test_block_mask_context_before_anchor_and_blocks_apart():
    m = block_mask(torch.tensor([[2, 5]]), 3, ctx_len=8, causal=False, window=None)[0, 0]
    ctx, blk = m[:, :8], m[:, 8:]
    assert ctx[:3].sum(1).tolist() == [2, 2, 2]  # block 0 (anchor 2) sees rows 0, 1
    assert ctx[3:, :5].all() and not ctx[3:, 5:].any()  # block 1 sees rows 0..4 only
    assert blk[:3, :3].all() and blk[3:, 3:].all()  # bidirectional inside a block
    assert not blk[:3, 3:].any() and not blk[3:, :3].any()  # never across blocks


def test_block_mask_causal_and_window():
    m = block_mask(torch.tensor([[10]]), 4, ctx_len=10, causal=True, window=3)[0, 0]
    q_pos = torch.arange(10, 14)
    k_pos = torch.arange(14)
    expect = (k_pos[None] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None] < 3)
    assert torch.equal(m, expect)


def test_cached_inference_equals_uncached_training_forward():
    """Two context extends + one block == the training forward with one anchor, even when
    the training taps run past the anchor (the mask must hide them)."""
    drafter = random_drafter()
    embed_fn, head_fn = embed_head()
    n_taps = len(drafter.config.target_layer_ids)
    taps = torch.randn(1, 20, n_taps * H)
    start, block = 13, torch.randint(0, V, (1, drafter.config.block_size))
    cache = drafter.make_context_cache()
    drafter.extend_context(taps[:, :7], cache)
    drafter.extend_context(taps[:, 7:start], cache)
    cached = drafter.draft_logits(block, cache, embed_fn, head_fn)
    with torch.no_grad():
        hidden = drafter(taps, embed_fn(block), torch.tensor([[start]]))
        full = drafter.compute_logits(hidden[:, 1:], head_fn)
    assert cached.shape == (1, drafter.config.block_size - 1, V)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_many_anchors_equal_one_at_a_time():
    drafter = random_drafter(layer_types=["full_attention"] * 3)
    embed_fn, _ = embed_head()
    B = drafter.config.block_size
    taps = torch.randn(2, 24, 2 * H)
    anchors = torch.tensor([[3, 9, 17], [5, 6, 12]])
    blocks = torch.randint(0, V, (2, 3 * B))
    with torch.no_grad():
        together = drafter(taps, embed_fn(blocks), anchors)
        for r in range(2):
            for g in range(3):
                alone = drafter(taps[r : r + 1], embed_fn(blocks[r : r + 1, g * B : (g + 1) * B]),
                                anchors[r : r + 1, g : g + 1])
                torch.testing.assert_close(together[r, g * B : (g + 1) * B], alone[0])


def test_softcap_and_multiplier_apply_to_draft_logits():
    drafter = random_drafter(final_logit_softcapping=2.0, output_multiplier=3.0)
    logits = drafter.compute_logits(torch.randn(1, 4, H), lambda h: h @ torch.randn(H, V) * 50)
    assert logits.abs().max() <= 2.0


def test_config_round_trip_and_z_lab_fields():
    cfg = config(final_logit_softcapping=30.0)
    d = config_dict(cfg, "float16")
    assert d["architectures"] == ["DFlashDraftModel"] and d["model_type"] == "qwen3"
    assert d["dflash_config"] == {"mask_token_id": V - 1, "target_layer_ids": [1, 3],
                                  "block_size": 6, "final_logit_softcapping": 30.0}
    assert DrafterConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_save_load_round_trip_single_file(tmp_path: Path):
    drafter = random_drafter()
    files = drafter.save_pretrained(tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    again = TorchDFlashDrafter.from_pretrained(tmp_path)
    for name, w in drafter.state_dict().items():
        assert torch.equal(again.state_dict()[name], w)


def test_sharding_respects_threshold_and_writes_index(tmp_path: Path):
    drafter = random_drafter()
    limit = 2**16 + 12_000  # a few tensors per shard
    files = drafter.save_pretrained(tmp_path, max_shard_bytes=limit)
    assert len(files) > 2
    assert all(f.stat().st_size < limit for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(drafter.state_dict())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    fewer = drafter.save_pretrained(tmp_path, max_shard_bytes=2**20)  # stale shards go
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f.name for f in fewer]
    again = TorchDFlashDrafter.from_pretrained(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in drafter.state_dict().items())


# --- bad input: one line, naming both values ---------------------------------------------
def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor_is_named(tmp_path: Path):
    random_drafter().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as exc:
        TorchDFlashDrafter.from_pretrained(tmp_path)
    assert "layers.1.mlp.up_proj.weight" in one_line(exc)


def test_wrong_shape_names_both_shapes(tmp_path: Path):
    random_drafter().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["fc.weight"] = torch.zeros(H, 3 * H)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as exc:
        TorchDFlashDrafter.from_pretrained(tmp_path)
    msg = one_line(exc)
    assert f"({H}, {3 * H})" in msg and f"({H}, {2 * H})" in msg


def test_missing_config_and_bad_json(tmp_path: Path):
    with pytest.raises(UserError, match=r"no config\.json"):
        TorchDFlashDrafter.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        TorchDFlashDrafter.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError) as exc:
        TorchDFlashDrafter.from_pretrained(tmp_path)
    assert "mask_token_id" in one_line(exc)


@pytest.mark.parametrize(
    ("over", "target", "needles"),
    [
        ({}, (H + 8, V, 6), [f"hidden_size {H}", f"{H + 8}"]),
        ({}, (H, V + 1, 6), [f"vocab_size {V}", f"{V + 1}"]),
        ({"target_layer_ids": [1, 7], "num_target_layers": None}, (H, V, 6), ["[7]", "6"]),
        ({"num_target_layers": 8}, (H, V, 6), ["8", "6"]),
        ({"mask_token_id": V + 3}, (H, V, 6), [f"{V + 3}", f"{V}"]),
    ],
)
def test_incompatible_target_is_refused(over, target, needles):
    with pytest.raises(UserError) as exc:
        check_compatible(config(**over), *target)
    msg = one_line(exc)
    assert all(n in msg for n in needles), msg


def test_unsupported_config_is_refused():
    with pytest.raises(UserError, match="rope_scaling"):
        TorchDFlashDrafter(config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(UserError, match="layer_types"):
        TorchDFlashDrafter(config(layer_types=["full_attention", "global", "full_attention"]))
    with pytest.raises(UserError, match="multiple of num_key_value_heads 3"):
        TorchDFlashDrafter(config(num_key_value_heads=3))


# --- the target adapter ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from mlx_engine.reference.tiny_target import build_tiny_target
    from mlx_engine.reference.torch_target import load_target

    return load_target(build_tiny_target(tmp_path_factory.mktemp("tiny") / "target"))


def test_taps_are_decoder_layer_outputs(tiny_target):
    ids = torch.randint(4, 512, (2, 21))
    logits, taps = tiny_target.forward_with_taps(ids, [1, 4])
    with torch.no_grad():
        out = tiny_target.model(ids, output_hidden_states=True)
    torch.testing.assert_close(taps, torch.cat([out.hidden_states[2], out.hidden_states[5]], -1))
    torch.testing.assert_close(logits, out.logits)
    with pytest.raises(UserError, match="not < target layers 6"):
        tiny_target.taps(ids, [6])


def test_embed_is_plain_lookup_not_gemma_scaled(tiny_target):
    ids = torch.tensor([[5, 300, 7]])
    plain = tiny_target.embed(ids)
    assert torch.equal(plain, tiny_target.embed_weight[ids])
    with torch.no_grad():  # Gemma's own embedding multiplies by sqrt(hidden)
        scaled = tiny_target.model.get_input_embeddings()(ids)
    torch.testing.assert_close(scaled, plain * tiny_target.hidden_size**0.5)


def test_greedy_continuation_is_the_targets_argmax(tiny_target):
    prompts = [[2, *range(300, 320)], [2, *range(400, 420)], [2, *range(260, 270)]]
    conts = tiny_target.greedy_continue(prompts, 12, batch_size=2, progress=False)
    for prompt, cont in zip(prompts, conts, strict=True):
        assert len(cont) == 12
        with torch.no_grad():
            argmax = tiny_target.model(torch.tensor([prompt + cont])).logits.argmax(-1)[0]
        assert argmax[len(prompt) - 1 : -1].tolist() == cont


def test_greedy_continuation_stops_after_eos(tiny_target):
    prompt = [2, *range(300, 320)]
    full = tiny_target.greedy_continue([prompt], 8, progress=False)[0]
    cut = tiny_target.greedy_continue([prompt], 8, eos_ids=[full[3]], progress=False)[0]
    assert cut == full[: full.index(full[3]) + 1]


def test_bad_target_path_is_one_line(tmp_path: Path):
    from mlx_engine.reference.torch_target import load_target

    with pytest.raises(UserError) as exc:
        load_target(tmp_path / "nope")
    assert "does not exist" in one_line(exc)
    with pytest.raises(UserError) as exc:
        load_target(tmp_path)
    assert "neither a model dir" in one_line(exc)


@pytest.mark.slow
def test_gguf_target_equals_the_converted_verifier_dir():
    """The GPU machine reads the GGUF directly (no mlx there): same model as the converted dir."""
    pytest.importorskip("gguf")
    from mlx_engine.gguf.convert import default_gguf_path, default_verifier_dir
    from mlx_engine.reference.torch_target import load_target

    ids = torch.tensor([[2, 2063, 563, 236779, 2497, 236769, 236749, 236787, 801, 236768]])
    with torch.no_grad():
        want = load_target(default_verifier_dir("float32")).model(ids).logits
        got = load_target(default_gguf_path()).model(ids).logits
    assert torch.equal(got, want)
